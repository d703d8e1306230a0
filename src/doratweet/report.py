"""Turn a run folder into plots and a Hugging Face model card (README.md).

A run folder holds `metrics.json` (settings, results, examples, environment), `train_log.jsonl` (one JSON
object per logged step; evaluation lines carry `val_macro_f1`) and `adapter/` in PEFT's format. The report
reads those files only: nothing is recomputed, so the card shows exactly what the run measured.

Results are nested `results[stage][split][mode]`, with stage `before` (zero-shot) or `after` (with the
adapter), and mode `score` (the likelihood of each label word decides) or `generate` (a free greedy answer,
parsed for a label word). Any of them may be missing; what is missing is left out of the card and plots.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Annotated, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from . import LABELS
from .errors import UserError, first_line
from .files import write_atomically
from .run_folder import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    CARD_FILE,
    LOG_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    is_own_card,
    refuse_foreign_plots,
    refuse_links,
    refuse_to_replace,
    sealed_card,
)

HUB_DATASET = "cardiffnlp/tweet_eval"
UNPARSED = "unparsed"
STAGES = ("before", "after")
MODES = ("score", "generate")
_STAGE_NAMES = {"before": "before (zero-shot)", "after": "after training"}
_MODE_NAMES = {"score": "label scored", "generate": "generated"}
# Card order, with the alt text each image gets.
_PLOT_CAPTIONS = {
    "training_curves": "Training loss and validation macro-F1",
    "confusion_before": "Confusion matrix before training",
    "confusion_after": "Confusion matrix after training",
    "per_class_f1": "Per-class F1 before and after training",
}


# ---------------------------------------------------------------------------------------------------------
# Names to show: what a card, a page or a Hub repo says instead of this machine's paths

# The Hub's repo ids: `owner/name`, or a bare legacy name such as `gpt2`.
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id and names no local file or folder, else None: a local path
    (`/home/me/models/tiny`, `models/tiny` where that folder exists) is no id anyone else can load."""
    if not name or not HUB_REPO_ID.fullmatch(name) or ".." in name or "--" in name or Path(name).exists():
        return None
    return name


def public_name(name: str | None) -> str | None:
    """A Hub id as it is, a local path as its last part: where it lies on this machine is nobody's business."""
    if name is None:
        return None
    return hub_id(name) or Path(name.rstrip("/")).name or name


def public_data_spec(spec: str | None) -> str | None:
    """`--data` as recorded, each local path reduced to its name (`train=/x/a.csv,test=/x/b.csv` ->
    `train=a.csv,test=b.csv`)."""
    if spec is None:
        return None
    parts = []
    for part in spec.split(","):
        split, equals, path = part.rpartition("=")
        parts.append(f"{split}{equals}{public_name(path)}")
    return ",".join(parts)


def public_metrics(metrics: dict) -> dict:
    """A metrics.json document with the names of `public_name` where it records local paths."""
    public = json.loads(json.dumps(metrics))
    for key in ("base_model_id", "model_source"):
        if isinstance(public.get(key), str):
            public[key] = public_name(public[key])
    if isinstance(public.get("data"), dict) and isinstance(public["data"].get("spec"), str):
        public["data"]["spec"] = public_data_spec(public["data"]["spec"])
    return public


def public_adapter_config(config: dict) -> dict:
    """PEFT's adapter_config.json as it may be published: `base_model_name_or_path` a Hub id or null (PEFT then
    needs the base model passed, as the card's example does), doratweet's own paths reduced to names."""
    public = json.loads(json.dumps(config))
    if isinstance(public.get("base_model_name_or_path"), str):
        public["base_model_name_or_path"] = hub_id(public["base_model_name_or_path"])
    own = public.get("doratweet")
    if isinstance(own, dict):
        for key in ("model_spec", "init_adapter"):
            if isinstance(own.get(key), str):
                own[key] = public_name(own[key])
    return public


# ---------------------------------------------------------------------------------------------------------
# Reading the run folder


def file_inside(run_dir: str | Path, relative: str | Path) -> Path | None:
    """The real path of `run_dir/relative` when it is a regular file, else None (absent, a folder, a device).
    A link is followed only while it stays inside the run folder: one leading out is a UserError naming it,
    so that nothing served or published from a run folder can reach the rest of the machine."""
    path = Path(run_dir) / relative
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # absent, a dangling link, a loop of links
        return None
    if not real.is_relative_to(Path(run_dir).resolve()):
        raise UserError(f"{path}: a link to {real}, outside the run folder; replace it with a copy of the file, "
                        "or remove it")
    return real if real.is_file() else None


# The fields of metrics.json that the card and the server read, with the types they need: `load_metrics`
# checks a file against them once, so a partial or tampered file is one line naming the field, never a crash
# in the middle of a card or a 500 from the server. Unknown fields are left out of what it returns.


def _whole_unicode(text: str) -> str:
    text.encode("utf-8")  # a lone surrogate (JSON "\\ud800") raises: no page or card could show it
    return text


Text = Annotated[str, AfterValidator(_whole_unicode)]
Count = Annotated[int, Field(ge=0)]


class _Fields(BaseModel):
    # strict: "0.6" is not a number and 1.0 not a count; no NaN or infinity, which JSON cannot carry
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class ClassFigures(_Fields):
    f1: float
    precision: float | None = None
    recall: float | None = None
    support: Count | None = None


class ResultBlock(_Fields):
    n: Count
    macro_f1: float
    macro_recall: float
    accuracy: float
    unparsed: Count | None = None
    macro_f1_4class: float | None = None
    per_class: dict[Text, ClassFigures] | None = None
    confusion_columns: list[Text] | None = None  # before `confusion`, whose check reads it
    confusion: list[list[Count]] | None = None

    @field_validator("per_class")
    @classmethod
    def _every_label(cls, per_class):
        if per_class is not None and set(LABELS) - set(per_class):
            raise ValueError(f"expected the labels {', '.join(LABELS)}")
        return per_class

    @field_validator("confusion")
    @classmethod
    def _a_row_per_label_and_a_count_per_column(cls, confusion, info: ValidationInfo):
        columns = info.data.get("confusion_columns") or [*LABELS, UNPARSED]
        if confusion is not None and (len(confusion) != len(LABELS) or any(len(row) != len(columns) for row in confusion)):
            raise ValueError(f"expected {len(LABELS)} rows of {len(columns)} counts ({', '.join(columns)})")
        return confusion


class TrainingRound(_Fields):
    first_train_tweet: int
    train_examples: Count
    steps: Count
    eval_every: int
    seconds: float
    best_val_macro_f1: float | None = None
    best_step: int | None = None


class TrainingSettings(_Fields):
    method: Text | None = None
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    targets: list[Text] | None = None
    use_rslora: bool | None = None
    epochs: float | None = None
    lr: float | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    warmup_ratio: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    seed: int | None = None
    steps: Count | None = None
    train_examples: Count | None = None
    tokens: Count | None = None
    seconds: float | None = None
    device: Text | None = None
    precision: Text | None = None
    trainable_parameters: Count | None = None
    total_parameters: Count | None = None
    best_step: int | None = None
    best_val_macro_f1: float | None = None
    rounds: list[TrainingRound] | None = None


class DataSummary(_Fields):
    spec: Text | None = None
    sizes: dict[Text, Count] | None = None


class Example(_Fields):
    text: Text | None = None
    label: Text | None = None
    before: Text | None = None
    after: Text | None = None


class RunMetrics(_Fields):
    base_model_id: Text
    model_source: Text | None = None
    data: DataSummary | None = None
    preset: Text | None = None
    subset_note: Text | None = None
    system_prompt: Text | None = None
    training: TrainingSettings | None = None
    results: dict[Text, dict[Text, dict[Text, ResultBlock]]] | None = None
    examples: list[Example] | None = None
    environment: dict[Text, Union[Text, bool, int, float, None]] | None = None
    total_seconds: float | None = None


def _read_json(path: Path, what_to_do: str):
    """The JSON value in `path`; unreadable bytes, other encodings and bad syntax are a one-line UserError."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror or error}); {what_to_do}") from None
    try:
        text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                        f"{what_to_do}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: invalid JSON ({error.msg}); {what_to_do}") from None
    except (ValueError, RecursionError) as error:  # a number past Python's digit limit; nesting too deep
        reason = "nested too deeply" if isinstance(error, RecursionError) else first_line(error)
        raise UserError(f"{path}: invalid JSON ({reason}); {what_to_do}") from None


def _field_path(location: tuple) -> str:
    """`results.after.test.score.macro_f1` or `examples[0]` from pydantic's error location."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")


def load_metrics(run_dir: str | Path) -> dict:
    """`run_dir/metrics.json` checked against `RunMetrics`, as a dict of the fields it declares (absent and
    null fields left out). The one reader of that file: `report` and `serve` both use it."""
    path = Path(run_dir) / METRICS_FILE
    rewrite = "run `doratweet run` again to rewrite it"
    if file_inside(run_dir, METRICS_FILE) is None:  # a link out of the run folder is refused there, naming it
        raise UserError(f"{path}: no such file; run `doratweet run` first, then report on its run folder")
    metrics = _read_json(path, rewrite)
    if not isinstance(metrics, dict):
        raise UserError(f"{path}: expected a JSON object (a doratweet metrics file), found {type(metrics).__name__}; "
                        f"{rewrite}")
    try:
        return RunMetrics.model_validate(metrics).model_dump(exclude_none=True)
    except ValidationError as error:
        problems = error.errors(include_url=False, include_input=False, include_context=False)
        first = problems[0]
        message = first["msg"].splitlines()[0].removeprefix("Value error, ")
        field = _field_path(first["loc"])
        raise UserError(f"{path}: {field or 'the file'}: {message}; fix that field, or {rewrite}") from None


def load_train_log(run_dir: str | Path) -> list[dict]:
    """The lines of `run_dir/train_log.jsonl`, in order; an absent file is an empty log. The fields the plots
    read (`step`, `loss`, `val_macro_f1`) must be numbers where present."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    log = []
    for line_number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{path}:{line_number}: not valid UTF-8; fix or delete that line") from None
        except (ValueError, RecursionError) as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else "not parseable"
            raise UserError(f"{path}:{line_number}: invalid JSON ({reason}); fix or delete that line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{line_number}: expected a JSON object; fix or delete that line")
        for key in ("step", "loss", "val_macro_f1"):
            value = record.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{path}:{line_number}: {key}: expected a number, found {json.dumps(value)[:40]}; "
                                "fix or delete that line")
        log.append(record)
    return log


def load_adapter_config(run_dir: str | Path) -> dict | None:
    """PEFT's `adapter_config.json` from `run_dir/adapter`, or None when the run saved no adapter."""
    path = Path(run_dir) / ADAPTER_DIR / ADAPTER_CONFIG_FILE
    if not path.is_file():
        return None
    config = _read_json(path, "run `doratweet run` again to rewrite it")
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object (a PEFT LoraConfig), found {type(config).__name__}; "
                        "run `doratweet run` again to rewrite it")
    return config


def result(metrics: dict, stage: str, mode: str, split: str = "test") -> dict | None:
    """One block of metrics, e.g. `result(m, "after", "score")`, or None when the run did not measure it."""
    by_split = (metrics.get("results") or {}).get(stage) or {}
    return (by_split.get(split) or {}).get(mode) or None


def _headline(metrics: dict, stage: str) -> dict | None:
    """The figures a summary quotes: label scoring when it was run, else generation."""
    return result(metrics, stage, "score") or result(metrics, stage, "generate")


def _headline_mode(metrics: dict) -> str | None:
    """One mode for plots that compare before and after, so both bars measure the same thing."""
    for mode in MODES:
        if result(metrics, "before", mode) or result(metrics, "after", mode):
            return mode
    return None


def _base_name(metrics: dict) -> str:
    """`SmolLM2-135M-Instruct` for `HuggingFaceTB/SmolLM2-135M-Instruct` (or a local folder's name)."""
    return public_name(metrics["base_model_id"]).split("/")[-1]


def _method(metrics: dict, adapter_config: dict | None) -> str:
    """The method, `dora` or `lora`, from the run's settings, else from the adapter's PEFT config."""
    method = (metrics.get("training") or {}).get("method")
    if method is None and adapter_config is not None:
        method = "dora" if adapter_config.get("use_dora") else "lora"
    return method or "dora"


# ---------------------------------------------------------------------------------------------------------
# Files


def _new_figure(**options):
    # matplotlib takes over half a second to import, so only the report pays for it, not every module
    # that reads metrics. Figure + the Agg canvas draw off-screen without pyplot's global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(layout="constrained", **options)
    FigureCanvasAgg(figure)
    return figure


def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Plots


def confusion_columns_to_show(block: dict) -> list[str]:
    """The predicted-label columns worth drawing: the labels, plus `unparsed` only if some answer was."""
    columns = block.get("confusion_columns", [*LABELS, UNPARSED])
    column_totals = [sum(row[i] for row in block["confusion"]) for i in range(len(columns))]
    return [name for name, total in zip(columns, column_totals) if name != UNPARSED or total > 0]


def _draw_confusion(block: dict, title: str) -> bytes:
    columns = block.get("confusion_columns", [*LABELS, UNPARSED])
    shown = confusion_columns_to_show(block)
    counts = [[row[columns.index(name)] for name in shown] for row in block["confusion"]]
    # Colour is the share of each true class (its recall), so a small class is as readable as neutral,
    # which holds about half of TweetEval's test tweets; the numbers printed are the raw counts.
    shares = [[count / max(sum(row), 1) for count in row] for row in counts]

    figure = _new_figure(figsize=(1.3 * len(shown) + 2.2, 4.2))
    axes = figure.add_subplot()
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            colour = "white" if shares[i][j] > 0.6 else "black"
            axes.text(j, i, f"{count:,}", ha="center", va="center", color=colour, fontsize=11)
    axes.set_xticks(range(len(shown)), shown)
    axes.set_yticks(range(len(LABELS)), LABELS)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"{title}\nmacro-F1 {block['macro_f1']:.3f}, n = {block['n']:,}", fontsize=11)
    return _png_bytes(figure)


def _draw_training_curves(train_lines: list[dict], eval_lines: list[dict]) -> bytes:
    panels = int(bool(train_lines)) + int(bool(eval_lines))
    figure = _new_figure(figsize=(7, 2.6 * panels + 0.4))
    all_axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    if train_lines:
        loss_axes = all_axes[0]
        loss_axes.plot([r["step"] for r in train_lines], [r["loss"] for r in train_lines], color="tab:blue")
        loss_axes.set_ylabel("training loss")
        loss_axes.grid(alpha=0.3)
    if eval_lines:
        f1_axes = all_axes[-1]
        steps = [r["step"] for r in eval_lines]
        f1_axes.plot(steps, [r["val_macro_f1"] for r in eval_lines], marker="o", color="tab:orange")
        f1_axes.set_ylabel("validation macro-F1")
        f1_axes.grid(alpha=0.3)
    all_axes[-1].set_xlabel("optimiser step")
    all_axes[0].set_title("Training")
    return _png_bytes(figure)


def _draw_per_class_f1(blocks: dict[str, dict], mode: str) -> bytes:
    figure = _new_figure(figsize=(6.5, 4))
    axes = figure.add_subplot()
    width = 0.8 / len(blocks)
    colours = {"before": "tab:gray", "after": "tab:blue"}
    for k, (stage, block) in enumerate(blocks.items()):
        positions = [i + (k - (len(blocks) - 1) / 2) * width for i in range(len(LABELS))]
        f1s = [block["per_class"][label]["f1"] for label in LABELS]
        bars = axes.bar(positions, f1s, width, label=_STAGE_NAMES[stage], color=colours[stage])
        axes.bar_label(bars, fmt="%.2f", fontsize=9)
    axes.set_xticks(range(len(LABELS)), LABELS)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("F1")
    axes.set_title(f"Per-class F1 on the test split ({_MODE_NAMES[mode]})")
    axes.legend(loc="upper left")
    return _png_bytes(figure)


def write_plots(run_dir: Path, metrics: dict, log: list[dict]) -> dict[str, Path]:
    """Draw the PNGs the run has data for into `run_dir/plots`; returns plot name -> file written."""
    drawn: dict[str, bytes] = {}

    train_lines = [r for r in log if "loss" in r and "step" in r]
    eval_lines = [r for r in log if "val_macro_f1" in r and "step" in r]
    if train_lines or eval_lines:
        drawn["training_curves"] = _draw_training_curves(train_lines, eval_lines)

    mode = _headline_mode(metrics)
    blocks = {stage: result(metrics, stage, mode) for stage in STAGES} if mode else {}
    for stage, block in blocks.items():
        if block and "confusion" in block:
            title = f"{_STAGE_NAMES[stage].capitalize()}, {_MODE_NAMES[mode]}"
            drawn[f"confusion_{stage}"] = _draw_confusion(block, title)
    per_class = {stage: block for stage, block in blocks.items() if block and "per_class" in block}
    if per_class:
        drawn["per_class_f1"] = _draw_per_class_f1(per_class, mode)

    written = {}
    for name, png in drawn.items():
        path = Path(run_dir) / PLOTS_DIR / f"{name}.png"
        write_atomically(path, png)
        written[name] = path
    return written


# ---------------------------------------------------------------------------------------------------------
# The model card


def _f3(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _count(value) -> str:
    return "–" if value is None else f"{value:,}"


def _table_cell(text) -> str:
    """Text safe inside a Markdown table row: a `|` would end the cell, a newline the row, and `<` could
    open an HTML tag on the Hub."""
    text = str(text).replace("<", "&lt;").replace("|", "\\|")
    return "<br>".join(text.splitlines())


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds:,.0f} s ({seconds / 60:.1f} min)"


def _front_matter(metrics: dict, method: str) -> str:
    # The Hub links base_model to that model's page: only a Hub id belongs there, never a local folder.
    card = {"base_model": hub_id(metrics["base_model_id"])} if hub_id(metrics["base_model_id"]) else {}
    card |= {
        "datasets": [HUB_DATASET],
        "library_name": "peft",
        "license": "apache-2.0",
        "language": ["en"],
        "pipeline_tag": "text-classification",
        "tags": ["doratweet", method, "peft", "sentiment-analysis", "tweet_eval"],
    }
    after = result(metrics, "after", "score")
    if after:
        card["model-index"] = [{
            "name": f"{_base_name(metrics)}-{method}-tweet-sentiment",
            "results": [{
                "task": {"type": "text-classification", "name": "Sentiment analysis"},
                "dataset": {"name": "TweetEval (sentiment)", "type": HUB_DATASET, "config": "sentiment",
                            "split": "test"},
                "metrics": [
                    {"type": "f1", "value": after["macro_f1"], "name": "Macro-F1"},
                    {"type": "recall", "value": after["macro_recall"], "name": "Macro-recall"},
                    {"type": "accuracy", "value": after["accuracy"], "name": "Accuracy"},
                ],
            }],
        }]
    return "---\n" + yaml.safe_dump(card, sort_keys=False, allow_unicode=True) + "---"


def _intro(metrics: dict, method_name: str) -> str:
    base = public_name(metrics["base_model_id"])
    lines = [
        f"A {method_name} adapter for `{base}` that labels the sentiment of a tweet as negative, neutral or "
        f"positive. It was trained with [doratweet](https://pypi.org/project/doratweet/) on TweetEval "
        f"(sentiment) and is saved in PEFT's format, so plain PEFT + transformers can load it too."
    ]
    before, after = _headline(metrics, "before"), _headline(metrics, "after")
    test_size = metrics.get("data", {}).get("sizes", {}).get("test")
    whole_test = bool(after) and after.get("n") == test_size
    if after:
        where = (f"On the whole test split ({test_size:,} tweets)" if whole_test else
                 f"On the first {after['n']:,} test tweets" if after.get("n") else "On the test split")
        summary = (f"{where} it reaches macro-F1 **{after['macro_f1']:.3f}** "
                   f"(macro-recall {after['macro_recall']:.3f}, accuracy {after['accuracy']:.3f}")
        if before:
            summary += f"; the base model zero-shot: macro-F1 {before['macro_f1']:.3f}"
        lines.append(summary + ").")
    if metrics.get("subset_note"):
        caveat = ("The figures above are on the whole test split." if whole_test else
                  "These figures are not directly comparable with results on the full TweetEval test split.")
        lines.append(f"> **Which tweets:** {metrics['subset_note']}. {caveat}")
    return "\n\n".join(lines)


def _how_to_use(metrics: dict, adapter_config: dict | None, adapter_path: str) -> str:
    system_prompt = json.dumps(metrics.get("system_prompt") or "", ensure_ascii=False)
    sections = [
        "## How to use",
        "### With doratweet",
        f'```bash\npip install doratweet\ndoratweet predict --adapter {adapter_path} "I love this!"\n```',
        "```python\nfrom doratweet import SentimentClassifier\n\n"
        f'clf = SentimentClassifier.load("{adapter_path}")\n'
        'clf.predict(["I love this!", "Stuck in traffic again."])  # one label per tweet\n```',
        "doratweet compares the likelihood of the three label words (the *label scored* rows in Results), so "
        "every tweet gets a label.",
        "### With PEFT and transformers",
        "Greedy generation of a few tokens gives the *generated* rows in Results; the answer is one label word.",
        f"""```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

BASE = "{public_name(metrics['base_model_id'])}"{"" if hub_id(metrics['base_model_id']) else "  # the local model folder it was trained on"}
ADAPTER = "{adapter_path}"  # or the Hub repo id, with subfolder="{ADAPTER_DIR}"
SYSTEM = {system_prompt}

tokenizer = AutoTokenizer.from_pretrained(BASE)
base = AutoModelForCausalLM.from_pretrained(BASE)
model = PeftModel.from_pretrained(base, ADAPTER).eval()

tweet = "I love this!"
messages = [{{"role": "system", "content": SYSTEM}}, {{"role": "user", "content": tweet}}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
)
with torch.no_grad():
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print(answer.strip())  # negative, neutral or positive
```""",
    ]
    if adapter_config:
        sections.append(
            f"`{ADAPTER_DIR}/` holds `{ADAPTER_CONFIG_FILE}` (PEFT LoraConfig: "
            f"`r={adapter_config.get('r')}`, `lora_alpha={adapter_config.get('lora_alpha')}`, "
            f"`use_dora={adapter_config.get('use_dora', False)}`) and the adapter weights."
        )
    return "\n\n".join(sections)


def _training_details(metrics: dict, method_name: str) -> str:
    training = metrics.get("training") or {}
    rows = [["method", method_name]]
    data = metrics.get("data") or {}
    if data:
        sizes = ", ".join(f"{split} {count:,}" for split, count in (data.get("sizes") or {}).items())
        rows.append(["data", f"`{public_data_spec(data.get('spec'))}`" + (f" ({sizes} tweets)" if sizes else "")])
    # (row name, key in metrics.training, how to show the value); keys the run did not record are skipped.
    settings = [
        ("rank r", "rank", str),
        ("alpha", "alpha", lambda v: f"{v:g}"),
        ("dropout", "dropout", lambda v: f"{v:g}"),
        ("target modules", "targets", lambda v: ", ".join(f"`{t}`" for t in v)),
        ("rsLoRA scaling", "use_rslora", lambda v: "yes" if v else "no"),
        ("epochs", "epochs", lambda v: f"{v:g}"),
        ("learning rate", "lr", lambda v: f"{v:g}"),
        ("batch size", "batch_size", str),
        ("gradient accumulation", "grad_accum", str),
        ("warm-up ratio", "warmup_ratio", lambda v: f"{v:g}"),
        ("weight decay", "weight_decay", lambda v: f"{v:g}"),
        ("max grad norm", "max_grad_norm", lambda v: f"{v:g}"),
        ("seed", "seed", str),
        ("optimiser steps", "steps", _count),
        ("training examples", "train_examples", _count),
        ("training tokens", "tokens", _count),
        ("training time", "seconds", _duration),
    ]
    rows += [[name, show(training[key])] for name, key, show in settings if training.get(key) is not None]
    if training.get("device"):
        rows.append(["device / precision", f"{training['device']} / {training.get('precision', '–')}"])
    trainable, total = training.get("trainable_parameters"), training.get("total_parameters")
    if trainable is not None:
        share = f" ({100 * trainable / total:.2f}% of {total:,})" if total else ""
        rows.append(["trainable parameters", f"{trainable:,}{share}"])
    if training.get("best_val_macro_f1") is not None:
        rows.append(["best validation macro-F1" + (" (last round)" if training.get("rounds") else ""),
                     f"{training['best_val_macro_f1']:.3f} at step {training.get('best_step', '–')}"])
    for number, round_ in enumerate(training.get("rounds") or [], start=1):
        first = round_["first_train_tweet"]
        kept = (f"; best validation macro-F1 {round_['best_val_macro_f1']:.3f} at step {round_['best_step']}, kept"
                if round_.get("best_val_macro_f1") is not None else "")
        start = "" if number == 1 else f" from round {number - 1}'s best adapter"
        rows.append([f"round {number}", f"train tweets {first:,}-{first + round_['train_examples'] - 1:,}, "
                     f"{round_['steps']:,} steps{start}, validated every {round_['eval_every']} steps"
                     f"{kept}; {_duration(round_['seconds'])}"])
    if metrics.get("preset"):
        rows.append(["preset", f"`{metrics['preset']}`"])

    sections = ["## Training details", _table(["setting", "value"], rows)]
    if metrics.get("system_prompt"):
        sections += ["System prompt:", f"```text\n{metrics['system_prompt']}\n```"]
    return "\n\n".join(sections)


def _results(metrics: dict) -> str | None:
    rows = []
    for stage in STAGES:
        for mode in MODES:
            block = result(metrics, stage, mode)
            if block:
                rows.append([
                    f"{_STAGE_NAMES[stage]}, {_MODE_NAMES[mode]}", _count(block.get("n")),
                    _f3(block.get("macro_f1")), _f3(block.get("macro_recall")), _f3(block.get("accuracy")),
                    _count(block.get("unparsed")), _f3(block.get("macro_f1_4class")),
                ])
    if not rows:
        return None
    header = ["TweetEval test", "n", "macro-F1", "macro-recall", "accuracy", "unparsed",
              "4-class macro-F1 (course metric)"]
    return "\n\n".join([
        "## Results",
        _table(header, rows),
        "*Label scored*: the likelihood of each label word decides, so no answer is unparsed. *Generated*: a "
        "free greedy answer is parsed for a label word; answers naming none are *unparsed* and count as wrong.",
        "Macro-recall (the mean recall over the three classes) is TweetEval's official metric for sentiment. "
        "The 4-class macro-F1 counts unparsed answers as a fourth class, as the course did, which is why it "
        "is lower than the 3-class macro-F1.",
    ])


def _examples(metrics: dict) -> str | None:
    examples = metrics.get("examples") or []
    if not examples:
        return None
    rows = [[_table_cell(e.get(key) or "–") for key in ("text", "label", "before", "after")] for e in examples]
    return "## Examples\n\n" + _table(["tweet", "true label", "before", "after"], rows)


def _plots(plots: dict[str, Path], run_dir: Path) -> str | None:
    if not plots:
        return None
    names = [name for name in _PLOT_CAPTIONS if name in plots] + [n for n in plots if n not in _PLOT_CAPTIONS]
    links = []
    for name in names:
        relative = Path(plots[name]).resolve().relative_to(Path(run_dir).resolve()).as_posix()
        links.append(f"![{_PLOT_CAPTIONS.get(name, name)}]({relative})")
    return "## Plots\n\n" + "\n\n".join(links)


def _environment(metrics: dict) -> str | None:
    environment = metrics.get("environment") or {}
    if not environment:
        return None
    return "## Environment\n\n" + "\n".join(f"- {key}: {value}" for key, value in environment.items())


def render_model_card(metrics: dict, adapter_config: dict | None, plots: dict[str, Path], run_dir: Path) -> str:
    """The README.md text: YAML front matter for the Hub, then what the adapter is, how to use it, how it
    was trained and how well it does."""
    method = _method(metrics, adapter_config)
    method_name = {"dora": "DoRA", "lora": "LoRA"}.get(method, method)
    # The card sits in the run folder; usage examples name the adapter as seen from the folder above it.
    adapter_path = f"{Path(run_dir).resolve().name}/{ADAPTER_DIR}"
    sections = [
        _front_matter(metrics, method),
        f"# {_base_name(metrics)} + {method_name} for tweet sentiment",
        _intro(metrics, method_name),
        _how_to_use(metrics, adapter_config, adapter_path),
        _training_details(metrics, method_name),
        _results(metrics),
        _examples(metrics),
        _plots(plots, run_dir),
        _environment(metrics),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Read a run folder, write its plots and README.md model card; returns the README's path."""
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    log = load_train_log(run_dir)
    adapter_config = load_adapter_config(run_dir)
    readme = run_dir / CARD_FILE
    refuse_links(run_dir, [CARD_FILE, PLOTS_DIR])
    refuse_to_replace(readme, is_own_card, "the model card")
    refuse_foreign_plots(run_dir)
    plots = write_plots(run_dir, metrics, log)
    write_atomically(readme, sealed_card(render_model_card(metrics, adapter_config, plots, run_dir)).encode("utf-8"))
    return readme
