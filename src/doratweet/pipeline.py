"""`doratweet run`: evaluate the base model, fine-tune with DoRA, evaluate again, write the run folder.

The run folder: adapter/ (PEFT format), metrics.json, predictions/test_{before,after}.txt (one label id
per line, TweetEval's format), train_log.jsonl, plots/, README.md (the model card).

Under torchrun every process trains (DDP); rank 0 alone evaluates before and after and writes the run folder,
while the others wait for it in training's first collective, and leave once training is done.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

import torch

from . import LABELS, __version__, distributed
from .adapters import load_adapter, read_adapter_config, target_module_names
from .adapters.inject import check_rank_fits
from .checkpoints import checkpoint_folders
from .data import Split, load_data, resolve_data_spec
from .errors import UserError
from .files import write_atomically
from .evaluate import Predictions, classification_metrics, predict
from .models import EMBEDDED_NAME, load_base_model
from .hardware import inference_model
from .predict import adapter_folder, base_model_spec
from .run_folder import (
    CARD_FILE,
    RUN_LAYOUT,
    TRAINING_LAYOUT,
    is_own_card,
    previous_run_entries,
    refuse_foreign_plots,
    refuse_links,
    refuse_to_replace,
    remove_previous_run,
)
from .prompts import DEFAULT_SYSTEM_PROMPT, make_prompt_format
from .train import ADAPTER_DIR, CHECKPOINT_DIR, TrainConfig, load_trained_adapter, train

log = logging.getLogger("doratweet")


@dataclass
class Round:
    """One round of training: a schedule of its own (warm-up, then decay) on the next `tweets` train tweets (None:
    the rest), starting from the previous round's best adapter."""

    tweets: int | None = None
    training: dict = field(default_factory=dict)  # TrainConfig fields that differ from the preset's in this round


@dataclass
class Preset:
    """How much data a run uses; `None` means the whole split."""

    name: str
    train_limit: int | None
    test_limit: int | None
    generate_limit: int | None  # generation is slower than scoring: evaluate it on fewer tweets
    eval_limit: int | None  # validation tweets scored during training
    training: dict = field(default_factory=dict)  # TrainConfig fields this preset sets
    rounds: tuple[Round, ...] = (Round(),)  # rounds before the last are kept in out/round-N


PRESETS = {
    # Sized for 2 CPU cores and < 15 minutes with the embedded 135M model, including both evaluations.
    # lr chosen on validation (500 tweets): 5e-4 -> macro-F1 0.622, 1e-3 -> 0.616 (docs/results.md).
    # Dropout 0: on CPU the dropout masks cost ~12% of a step, and 188 steps are too few to overfit.
    "quick": Preset("quick", train_limit=3000, test_limit=1000, generate_limit=200, eval_limit=500,
                    training=dict(epochs=1, batch_size=16, lr=5e-4, eval_every=0, dropout=0.0)),
    # The recipe of the adapter that ships with doratweet, the best of the configurations measured so far
    # (docs/experiments.md, runs 8 and 9): quick's settings, validated on 1,000 validation tweets every 125 steps
    # with the best kept, on the first 20,000 train tweets; then a second round from that adapter on the other
    # 25,615 (evaluated every 200 steps, as run 9 was). Whole test split. ~2 h 20 min on 2 CPU cores.
    "best": Preset("best", train_limit=None, test_limit=None, generate_limit=2000, eval_limit=1000,
                   training=dict(epochs=1, batch_size=16, lr=5e-4, eval_every=125, save_every=125, dropout=0.0),
                   rounds=(Round(20_000), Round(None, dict(eval_every=200, save_every=200)))),
    "full": Preset("full", train_limit=None, test_limit=None, generate_limit=None, eval_limit=None,
                   training=dict(epochs=1, batch_size=64, lr=2e-4, eval_every=200, dropout=0.05)),
}


def default_preset() -> str:
    return "full" if torch.cuda.is_available() else "quick"


def training_config(preset: Preset, overrides: dict) -> TrainConfig:
    """Preset values, then the options the user gave explicitly (those that are not None)."""
    values = {**preset.training, **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(**values)


def round_config(config: TrainConfig, round_: Round, overrides: dict) -> TrainConfig:
    """The run's training settings as `round_` changes them; an option the user gave explicitly wins."""
    return replace(config, **{k: v for k, v in round_.training.items() if overrides.get(k) is None})


def training_rounds(train_split: Split, rounds: tuple[Round, ...]) -> list[tuple[Round, int, Split]]:
    """Each round with the index of its first train tweet and its tweets: consecutive slices of `train_split`.
    Rounds left without tweets (a --train-limit below the preset's sizes) are dropped."""
    sliced, offset = [], 0
    for round_ in rounds:
        if offset >= len(train_split):
            break
        tweets = train_split.skip(offset).head(round_.tweets)
        sliced.append((round_, offset, tweets))
        offset += len(tweets)
    return sliced


def timed_predictions(model, fmt, split: Split, mode: str, batch_size: int, progress: bool = True
                      ) -> tuple[Predictions, dict]:
    started = time.perf_counter()
    predictions = predict(model, fmt, split.texts, mode, batch_size, progress=progress)
    seconds = time.perf_counter() - started
    metrics = classification_metrics(split.labels, predictions.labels)
    metrics.update(mode=mode, precision=str(next(model.parameters()).dtype).replace("torch.", ""), split=split.name, seconds=round(seconds, 2),
                   tweets_per_s=round(len(split) / max(seconds, 1e-9), 1))
    return predictions, metrics


def evaluate_both_modes(model, fmt, test: Split, generate_test: Split, batch_size: int, bf16: bool | None,
                        examples: Split, progress: bool = True) -> tuple[Predictions, dict, list[int]]:
    """Both modes on the test tweets, and the score-mode labels of the card's example tweets."""
    evaluated = inference_model(model, next(model.parameters()).device, bf16)
    scored, score_metrics = timed_predictions(evaluated, fmt, test, "score", batch_size, progress)
    results = {"score": score_metrics}
    if len(generate_test):
        _, results["generate"] = timed_predictions(evaluated, fmt, generate_test, "generate", batch_size, progress)
    example_labels = predict(evaluated, fmt, examples.texts, "score").labels
    del evaluated
    for mode, m in results.items():
        log.info("  %-8s n=%d macro-F1 %.3f macro-recall %.3f accuracy %.3f unparsed %d (%.1f tweets/s)",
                 mode, m["n"], m["macro_f1"], m["macro_recall"], m["accuracy"], m["unparsed"], m["tweets_per_s"])
    return scored, results, example_labels


def check_out_dir(out_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse, before anything is loaded or written, an --out that would lose the user's files or cannot resume."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume: choose one (start again, or continue the run in --out)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file; choose a folder")
    if resume and not any(checkpoint_folders(folder / CHECKPOINT_DIR) or (folder / ROUND_SUMMARY).is_file()
                          for folder in [out_dir, *out_dir.glob("round-*")]):
        raise UserError(f"--resume: no checkpoint in {out_dir / CHECKPOINT_DIR}; train without --resume, or point "
                        "--out at the run (checkpoints are written every --save-every steps and on Ctrl-C)")
    if out_dir.exists() and any(out_dir.iterdir()) and not (overwrite or resume):
        raise UserError(f"--out {out_dir}: the folder exists and is not empty; pass --overwrite or choose another")
    if resume:  # a resumed run writes into the folder as it is: never through a link out of it
        refuse_links(out_dir, [*RUN_LAYOUT.names, *(path.name for path in out_dir.glob("round-*"))])
        for folder in out_dir.glob("round-*"):
            refuse_links(folder, TRAINING_LAYOUT.names)
        refuse_foreign_plots(out_dir)
    if overwrite:
        previous_run_entries(out_dir)  # refuses, naming it, anything under a run's names that no run wrote


# The options that fix an adapter's shape; an --init-adapter brings its own.
ADAPTER_SHAPE = ("method", "rank", "alpha", "targets", "use_rslora")


def adopt_adapter_shape(init_adapter: str, given: dict, config: TrainConfig) -> Path:
    """--init-adapter: its folder, with its shape copied into `config`. A shape option the user `given` with another
    value is refused: a different rank or other targets would be a new adapter, not this one trained further."""
    folder = adapter_folder(init_adapter)
    saved = read_adapter_config(folder)
    for name in ADAPTER_SHAPE:
        value, own = given.get(name), getattr(saved, name)
        if name == "targets" and value is not None:
            value, own = sorted(value), sorted(own)
        if value is not None and value != own:
            flag = "--rslora" if name == "use_rslora" else "--" + name
            raise UserError(f"{flag} {value}: the --init-adapter {init_adapter} has {own}; drop {flag} "
                            "(an adapter trained further keeps its shape)")
        setattr(config, name, getattr(saved, name))
    return folder


def start_from_adapter(model, folder: Path, config: TrainConfig, train_skip: int) -> None:
    """Load the --init-adapter for training (with this run's dropout) and record where the run started."""
    load_adapter(model, folder, dropout=config.dropout)
    config.extra.update(init_adapter=str(folder), train_skip=train_skip)


ROUND_SUMMARY = "train_summary.json"  # written in out/round-N when that round is done


def train_in_rounds(model, fmt, rounds: list[tuple[Round, int, Split]], validation: Split | None,
                    config: TrainConfig, overrides: dict, out_dir: Path, train_skip: int, *, resume: bool,
                    progress: bool, base_model_id: str | None) -> dict:
    """Train round after round, each from the best adapter of the one before. A round before the last is kept in
    out/round-N; the last writes out/ itself. With `resume`, a finished round is loaded, not trained again.
    Returns the last round's summary with the totals of all rounds (and, for several, a list of them)."""
    summaries = []
    for number, (round_, first, tweets) in enumerate(rounds, start=1):
        last = number == len(rounds)
        folder = out_dir if last else out_dir / f"round-{number}"
        round_settings = round_config(config, round_, overrides)
        if number > 1:  # recorded like --init-adapter/--train-skip: where this round started, and on which tweets
            round_settings.extra = {**config.extra, "init_adapter": str(out_dir / f"round-{number - 1}" / ADAPTER_DIR),
                                    "train_skip": train_skip + first}
        if len(rounds) > 1:
            log.info("round %d of %d: train tweets %d-%d", number, len(rounds), train_skip + first + 1,
                     train_skip + first + len(tweets))
        if resume and not last and distributed.any_process((folder / ROUND_SUMMARY).is_file()):
            summary = distributed.broadcast_from_main(
                json.loads((folder / ROUND_SUMMARY).read_text()) if distributed.is_main_process() else None)
            load_trained_adapter(model, round_settings, folder / ADAPTER_DIR)
            log.info("round %d was done before: its best adapter (step %s) is loaded", number, summary["best_step"])
        else:
            resumes = resume and distributed.any_process(bool(checkpoint_folders(folder / CHECKPOINT_DIR)))
            summary = train(model, fmt, tweets, validation, round_settings, folder, resume=resumes,
                            progress=progress, base_model_id=base_model_id)
            if not last and distributed.is_main_process():
                write_json(folder / ROUND_SUMMARY, summary)
        summaries.append({**summary, "first_train_tweet": train_skip + first + 1})
    if len(summaries) == 1:
        return summaries[0]
    totals = {key: sum(s[key] for s in summaries) for key in ("steps", "train_examples", "tokens")}
    totals["seconds"] = round(sum(s["seconds"] for s in summaries), 2)
    return {**summaries[-1], **totals, "rounds": summaries}


def start_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create --out once the inputs are known to be good, so a bad input leaves no half-made folder behind.
    --overwrite removes the previous run's files (only those: see run_folder.py), so that none of them passes for
    this run's: an old checkpoint or round a later --resume would pick up, an old card beside a new adapter."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_previous_run(out_dir)


def write_json(path: Path, value) -> None:
    write_atomically(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_label_ids(path: Path, labels) -> None:
    write_atomically(path, "".join(f"{int(y)}\n" for y in labels))


def environment(device: torch.device) -> dict:
    import transformers

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{os.cpu_count()}-core {platform.processor() or platform.machine()} CPU")
    return {"device": device.type, "machine": machine, "torch": torch.__version__,
            "transformers": transformers.__version__, "doratweet": __version__, "date": date.today().isoformat()}


@distributed.process_group()  # under torchrun: this process's part of the job (see the module's docstring)
def run_pipeline(
    *,
    model_spec: str | None,
    data_spec: str | None,
    data_options: dict | None = None,
    out_dir: str | os.PathLike,
    preset_name: str | None = None,
    training_overrides: dict | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    generate_limit: int | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    init_adapter: str | None = None,
    train_skip: int = 0,
    batch_size: int = 32,
    overwrite: bool = False,
    resume: bool = False,
    eval_bf16: bool | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    from .report import public_name, write_report

    started = time.perf_counter()
    main = distributed.is_main_process()
    preset = PRESETS[preset_name or default_preset()]
    preset = replace(preset, train_limit=train_limit or preset.train_limit, test_limit=test_limit or preset.test_limit,
                     generate_limit=generate_limit or preset.generate_limit)
    data_spec = resolve_data_spec(data_spec)
    out_dir = Path(out_dir)
    overrides = training_overrides or {}
    config = training_config(preset, overrides)
    config.eval_limit = config.eval_limit or preset.eval_limit
    init_folder = adopt_adapter_shape(init_adapter, overrides, config) if init_adapter else None
    model_spec = model_spec or (base_model_spec(read_adapter_config(init_folder)) if init_folder else EMBEDDED_NAME)
    config.extra = {"system_prompt": system_prompt, "model_spec": model_spec, "labels": list(LABELS)}
    if main:
        check_out_dir(out_dir, overwrite, resume)
        if resume:  # the card is written at the very end: a README.md that is not one is refused now
            refuse_to_replace(out_dir / CARD_FILE, is_own_card, "the model card")

    splits = load_data(data_spec, **(data_options or {}))
    for needed in ("train", "test"):
        if needed not in splits:
            raise UserError(f"--data {data_spec}: has no {needed} split (found: {', '.join(splits)})")
    train_split = splits["train"].skip(train_skip).head(preset.train_limit)
    rounds = training_rounds(train_split, preset.rounds)
    if config.fsdp and len(rounds) > 1:
        raise UserError(f"--fsdp: the {preset.name} preset trains in {len(rounds)} rounds, which FSDP does not "
                        "support; drop --fsdp (torchrun then uses DDP) or choose another --preset")
    test = splits["test"].head(preset.test_limit)
    generate_test = test.head(preset.generate_limit)
    validation = splits.get("validation")
    subset_note = describe_subsets(splits, train_split, rounds, test, generate_test, train_skip)
    if subset_note:
        log.info("preset %s: %s", preset.name, subset_note)

    device = distributed.process_device()
    log.info("loading base model %s", model_spec)
    with distributed.main_process_first():
        base = load_base_model(model_spec, device=device, trust_remote_code=trust_remote_code)
    fmt = make_prompt_format(base.tokenizer, system_prompt)
    # An unknown --targets, or a --rank the layers cannot take, fails now, not after the evaluation
    target_module_names(base.model, config.targets)
    if not init_folder:  # an --init-adapter brings its own rank
        check_rank_fits(base.model, config.targets, config.rank)
    examples_split = splits["train"].head(5)

    if main:
        start_out_dir(out_dir, overwrite)
        log.info("before fine-tuning (test split):")
        before_scored, before, examples_before = evaluate_both_modes(
            base.model, fmt, test, generate_test, batch_size, eval_bf16, examples_split, progress)

    if init_folder:  # after the "before" evaluation, which stays the base model's
        start_from_adapter(base.model, init_folder, config, train_skip)
    log.info("fine-tuning: %s", config)
    summary = train_in_rounds(base.model, fmt, rounds, validation, config, overrides, out_dir, train_skip,
                              resume=resume, progress=progress, base_model_id=base.base_model_id)
    if not main:
        return {"training": summary}

    log.info("after fine-tuning (test split):")
    after_scored, after, examples_after = evaluate_both_modes(
        base.model, fmt, test, generate_test, batch_size, eval_bf16, examples_split, progress)

    write_label_ids(out_dir / "predictions" / "test_before.txt", before_scored.labels)
    write_label_ids(out_dir / "predictions" / "test_after.txt", after_scored.labels)
    metrics = {
        "base_model_id": base.base_model_id,
        "model_source": public_name(model_spec),  # the --model given, as a name: no path into the user's cache
        "data": {"spec": data_spec, "sizes": {name: len(s) for name, s in splits.items()}},
        "preset": preset.name,
        "subset_note": subset_note,
        "system_prompt": system_prompt,
        "training": summary,
        "results": {"before": {"test": before}, "after": {"test": after}},
        "examples": [
            {"text": t, "label": LABELS[y], "before": LABELS[b], "after": LABELS[a]}
            for t, y, b, a in zip(examples_split.texts, examples_split.labels, examples_before, examples_after)
        ],
        "environment": {**environment(device), "evaluation_precision": before["score"]["precision"]},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out_dir / "metrics.json", metrics)
    write_report(out_dir)
    log.info("done in %.0f s: %s", metrics["total_seconds"], out_dir)
    return metrics


def describe_subsets(splits: dict[str, Split], train_split: Split, rounds: list, test: Split, generate_test: Split,
                     train_skip: int = 0) -> str | None:
    parts = []
    if len(rounds) > 1:
        spans = [f"{train_skip + first + 1:,}-{train_skip + first + len(tweets):,}" for _, first, tweets in rounds]
        parts.append(f"trained in {len(rounds)} rounds, on train tweets {', then '.join(spans)} of "
                     f"{len(splits['train']):,}, each round from the previous one's best adapter")
    elif train_skip:
        parts.append(f"trained on train tweets {train_skip + 1:,}-{train_skip + len(train_split):,} of "
                     f"{len(splits['train']):,}")
    elif len(train_split) < len(splits["train"]):
        parts.append(f"trained on the first {len(train_split):,} of {len(splits['train']):,} train tweets")
    if len(test) < len(splits["test"]):
        parts.append(f"scored on the first {len(test):,} of {len(splits['test']):,} test tweets")
    if len(generate_test) < len(test):
        parts.append(f"generation evaluated on the first {len(generate_test):,}")
    return "; ".join(parts) or None
