"""The report turns a run folder into PNG plots and a Hugging Face model card (README.md)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib import image

from doratweet.errors import UserError
from doratweet.report import (
    confusion_columns_to_show,
    load_metrics,
    render_model_card,
    write_plots,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SYSTEM_PROMPT = 'Classify the sentiment of the tweet. Answer with one word: "negative", "neutral" or "positive".'


def block(mode: str, macro_f1: float, macro_recall: float, accuracy: float, confusion: list[list[int]]) -> dict:
    """One metrics block as evaluate.classification_metrics writes it (figures rounded for reading)."""
    unparsed = sum(row[3] for row in confusion)
    labels = ("negative", "neutral", "positive")
    return {
        "mode": mode, "split": "test", "n": sum(map(sum, confusion)),
        "macro_f1": macro_f1, "macro_recall": macro_recall, "accuracy": accuracy, "unparsed": unparsed,
        "macro_f1_4class": 0.75 * macro_f1, "seconds": 9.8, "tweets_per_s": 102.0,
        "per_class": {
            label: {"precision": 0.6, "recall": 0.6, "f1": f1, "support": sum(confusion[i])}
            for i, (label, f1) in enumerate(zip(labels, (macro_f1 - 0.1, macro_f1, macro_f1 + 0.1)))
        },
        "confusion": confusion,
        "confusion_columns": [*labels, "unparsed"],
    }


BEFORE_SCORE = block("score", 0.245, 0.387, 0.350, [[100, 150, 73, 0], [120, 300, 69, 0], [30, 90, 68, 0]])
AFTER_SCORE = block("score", 0.6034, 0.6121, 0.6247, [[230, 70, 23, 0], [60, 340, 89, 0], [20, 73, 95, 0]])
AFTER_GENERATE = block("generate", 0.5871, 0.5902, 0.6, [[220, 70, 23, 10], [60, 330, 89, 10], [20, 70, 90, 8]])

METRICS = {
    "base_model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "model_source": "/root/.cache/doratweet/models/smollm2-135m-instruct",
    "data": {"spec": "tweet_eval", "sizes": {"train": 45615, "validation": 2000, "test": 12284}},
    "preset": "quick",
    "subset_note": "trained on the first 4,000 train tweets; evaluated on the first 1,000 test tweets",
    "system_prompt": SYSTEM_PROMPT,
    "training": {
        "method": "dora", "rank": 16, "alpha": 32.0, "dropout": 0.05,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "use_rslora": False, "epochs": 1, "lr": 0.0002, "batch_size": 16, "grad_accum": 1,
        "warmup_ratio": 0.03, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0, "steps": 250,
        "train_examples": 4000, "tokens": 240000, "seconds": 512.3, "device": "cpu", "precision": "fp32",
        "trainable_parameters": 1234567, "total_parameters": 134515008, "best_step": 250,
        "best_val_macro_f1": 0.61,
    },
    "results": {
        "before": {"test": {"score": BEFORE_SCORE}},
        "after": {"test": {"score": AFTER_SCORE, "generate": AFTER_GENERATE}},
    },
    "examples": [
        {"text": "best | worst day\never", "label": "neutral", "before": "negative", "after": "neutral"},
        {"text": "I love this phone, best purchase ever", "label": "positive", "before": "neutral",
         "after": "positive"},
    ],
    "environment": {"device": "cpu", "machine": "2-core Intel Xeon", "torch": "2.13.0",
                    "transformers": "5.23.0", "doratweet": "0.1.0", "date": "2026-11-26"},
}
ADAPTER_CONFIG = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": METRICS["base_model_id"],
    "r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "target_modules": METRICS["training"]["targets"],
    "use_dora": True, "use_rslora": False,
}


def train_log() -> list[dict]:
    """18 training lines with a falling loss and 2 evaluation lines, in the order training writes them."""
    lines = []
    for step in range(10, 190, 10):
        lines.append({"step": step, "epoch": step / 250, "loss": 2.0 / (1 + step / 50), "lr": 0.0002,
                      "tokens_per_s": 420.0, "elapsed_s": step * 2.0})
        if step in (90, 180):
            lines.append({"step": step, "val_macro_f1": 0.4 + step / 1000, "val_macro_recall": 0.5,
                          "val_accuracy": 0.55})
    return lines


def make_run_dir(folder: Path, metrics: dict = METRICS, log: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log_lines = train_log() if log is None else log
    (folder / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log_lines))
    (folder / "adapter").mkdir(exist_ok=True)
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    return folder


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run_dir(tmp_path / "run-quick")


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory) -> Path:
    """One full run folder with its report written, shared by the tests that only read it."""
    folder = make_run_dir(tmp_path_factory.mktemp("runs") / "run-quick")
    write_report(folder)
    return folder


@pytest.fixture(scope="module")
def card(reported_run) -> str:
    return (reported_run / "README.md").read_text(encoding="utf-8")


def front_matter(card_text: str) -> dict:
    assert card_text.startswith("---\n")
    yaml_text = card_text.split("\n---\n", 1)[0].removeprefix("---\n")
    return yaml.safe_load(yaml_text)


def section(card_text: str, heading: str) -> str:
    """The text under `## heading`, up to the next `## `."""
    return card_text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


# --- the model card --------------------------------------------------------------------------------------


def test_card_has_every_section_heading(card):
    for heading in ("How to use", "Training details", "Results", "Examples", "Plots", "Environment"):
        assert f"\n## {heading}\n" in card
    assert "\n# SmolLM2-135M-Instruct + DoRA for tweet sentiment\n" in card


def test_front_matter_is_valid_yaml_with_the_hub_fields(card):
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["datasets"] == ["cardiffnlp/tweet_eval"]
    assert meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0"
    assert meta["language"] == ["en"]
    assert meta["pipeline_tag"] == "text-classification"
    assert set(meta["tags"]) == {"doratweet", "dora", "peft", "sentiment-analysis", "tweet_eval"}


def test_model_index_reports_the_after_training_label_scored_test_metrics(card):
    (entry,) = front_matter(card)["model-index"]
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-classification"
    assert result["dataset"] == {"name": "TweetEval (sentiment)", "type": "cardiffnlp/tweet_eval",
                                 "config": "sentiment", "split": "test"}
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert values == {"f1": AFTER_SCORE["macro_f1"], "recall": AFTER_SCORE["macro_recall"],
                      "accuracy": AFTER_SCORE["accuracy"]}
    assert {m["type"]: m["name"] for m in result["metrics"]}["f1"] == "Macro-F1"


def test_intro_says_what_the_adapter_is_and_quotes_the_subset_note(card):
    intro = card.split("\n## How to use\n", 1)[0]
    assert "DoRA adapter for `HuggingFaceTB/SmolLM2-135M-Instruct`" in intro
    assert "negative, neutral or positive" in intro
    assert f"> **Which tweets:** {METRICS['subset_note']}" in intro


def test_intro_says_which_test_tweets_the_figures_come_from(card, tmp_path):
    # METRICS scored 1,000 of 12,284 test tweets: the intro says so and warns against comparing.
    intro = card.split("\n## How to use\n", 1)[0]
    assert f"On the first {AFTER_SCORE['n']:,} test tweets it reaches macro-F1 **0.603**" in intro
    assert "not directly comparable" in intro
    # Trained on a subset but scored on the whole split (the shipped adapter): no warning about the figures.
    whole = {"results": {stage: {"test": {"score": {**figures, "n": 12284}}}
                         for stage, figures in (("before", BEFORE_SCORE), ("after", AFTER_SCORE))}}
    card = render_model_card({**METRICS, **whole, "subset_note": "trained on the first 20,000 of 45,615 train tweets"},
                             ADAPTER_CONFIG, {}, tmp_path)
    intro = card.split("\n## How to use\n", 1)[0]
    assert "On the whole test split (12,284 tweets) it reaches macro-F1 **0.603**" in intro
    assert "The figures above are on the whole test split." in intro and "not directly comparable" not in intro


def test_card_without_subset_note_has_no_subset_quote(tmp_path):
    metrics = {**METRICS, "subset_note": None}
    card = render_model_card(metrics, ADAPTER_CONFIG, {}, tmp_path)
    assert "subsets" not in card


def test_peft_usage_builds_the_chat_prompt_with_the_runs_system_prompt(card):
    usage = section(card, "How to use")
    assert "pip install doratweet" in usage
    assert 'doratweet predict --adapter run-quick/adapter "I love this!"' in usage
    assert 'SentimentClassifier.load("run-quick/adapter")' in usage
    assert 'BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"' in usage
    assert f"SYSTEM = {json.dumps(SYSTEM_PROMPT)}" in usage
    assert "PeftModel.from_pretrained(base, ADAPTER)" in usage
    assert "add_generation_prompt=True" in usage
    assert "do_sample=False" in usage


def test_training_table_lists_settings_and_the_trainable_share(card):
    details = section(card, "Training details")
    assert "| rank r | 16 |" in details
    assert "| learning rate | 0.0002 |" in details
    assert "| target modules | `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj` |" in details
    assert "| trainable parameters | 1,234,567 (0.92% of 134,515,008) |" in details
    assert "| training time | 512 s (8.5 min) |" in details
    assert SYSTEM_PROMPT in details


def test_results_table_has_a_row_per_measured_stage_and_mode_with_3_decimals(card):
    results = section(card, "Results")
    rows = [line for line in results.splitlines() if line.startswith("| before") or line.startswith("| after")]
    assert rows == [
        "| before (zero-shot), label scored | 1,000 | 0.245 | 0.387 | 0.350 | 0 | 0.184 |",
        "| after training, label scored | 1,000 | 0.603 | 0.612 | 0.625 | 0 | 0.453 |",
        "| after training, generated | 1,000 | 0.587 | 0.590 | 0.600 | 28 | 0.440 |",
    ]
    assert "TweetEval's official metric" in results


def test_examples_table_escapes_pipes_and_newlines(card):
    examples = section(card, "Examples")
    assert "| best \\| worst day<br>ever | neutral | negative | neutral |" in examples


def test_card_links_each_plot_by_its_relative_path(card):
    plots = section(card, "Plots")
    for name in ("training_curves", "confusion_before", "confusion_after", "per_class_f1"):
        assert f"](plots/{name}.png)" in plots


def test_environment_lists_the_runs_machine_and_versions(card):
    environment = section(card, "Environment")
    assert "- machine: 2-core Intel Xeon" in environment
    assert "- torch: 2.13.0" in environment


def test_card_without_generate_results_examples_or_plots_leaves_them_out(tmp_path):
    metrics = copy.deepcopy(METRICS)
    del metrics["results"]["after"]["test"]["generate"]
    del metrics["examples"]
    card = render_model_card(metrics, None, {}, tmp_path)
    assert "generated |" not in section(card, "Results")
    assert "## Examples" not in card
    assert "## Plots" not in card
    assert "adapter_config.json" not in card


# --- plots ---------------------------------------------------------------------------------------------------


def test_plots_are_real_pngs_that_read_back(reported_run):
    for name in ("training_curves", "confusion_before", "confusion_after", "per_class_f1"):
        path = reported_run / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
        assert np.ptp(pixels[..., :3]) > 0.5  # drawn on, not a blank canvas


def test_writing_plots_leaves_no_temporary_files(reported_run):
    assert sorted(p.name for p in (reported_run / "plots").iterdir()) == [
        "confusion_after.png", "confusion_before.png", "per_class_f1.png", "training_curves.png",
    ]


def test_plots_without_data_are_skipped(tmp_path):
    metrics = {**METRICS, "results": {"after": {"test": {"score": AFTER_SCORE}}}}
    written = write_plots(tmp_path, metrics, log=[])
    assert sorted(written) == ["confusion_after", "per_class_f1"]
    assert written["confusion_after"] == tmp_path / "plots" / "confusion_after.png"


def test_confusion_shows_the_unparsed_column_only_when_some_answer_was_unparsed():
    assert confusion_columns_to_show(AFTER_SCORE) == ["negative", "neutral", "positive"]
    assert confusion_columns_to_show(AFTER_GENERATE) == ["negative", "neutral", "positive", "unparsed"]


# --- reading the run folder ------------------------------------------------------------------------------


def test_missing_metrics_json_says_to_run_first(tmp_path):
    with pytest.raises(UserError, match=r"metrics\.json: no such file; run `doratweet run` first"):
        write_report(tmp_path)


def test_invalid_metrics_json_names_the_file_and_line(tmp_path):
    (tmp_path / "metrics.json").write_text('{"base_model_id": "x",\n  oops}\n')
    with pytest.raises(UserError, match=r"metrics\.json:2: invalid JSON"):
        load_metrics(tmp_path)


def test_malformed_log_line_names_the_file_and_line(run_dir):
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    lines[2] = '{"step": 30, "loss": '
    (run_dir / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"train_log\.jsonl:3: invalid JSON"):
        write_report(run_dir)


def test_report_without_log_or_adapter_still_writes_a_card(tmp_path):
    folder = tmp_path / "bare-run"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    readme = write_report(folder)
    assert "## Results" in readme.read_text()
    assert not (folder / "plots" / "training_curves.png").exists()


def test_write_report_is_idempotent(run_dir):
    first = write_report(run_dir).read_text()
    second = write_report(run_dir).read_text()
    assert first == second


def tampered(change) -> dict:
    metrics = copy.deepcopy(METRICS)
    change(metrics)
    return metrics


# (what was done to a good metrics.json, the field the one-line error must name)
TAMPERED = [
    (lambda m: m.update(results=[]), "results"),
    (lambda m: m.update(training="fast"), "training"),
    (lambda m: m.update(base_model_id=5), "base_model_id"),
    (lambda m: m.pop("base_model_id"), "base_model_id"),
    (lambda m: m.update(data={"sizes": "many"}), "data.sizes"),
    (lambda m: m["data"]["sizes"].update(test=None), "data.sizes.test"),
    (lambda m: m.update(examples=["a tweet"]), "examples[0]"),
    (lambda m: m["results"]["after"]["test"]["score"].update(macro_f1="high"), "results.after.test.score.macro_f1"),
    (lambda m: m["results"]["after"]["test"]["score"].update(macro_f1=float("nan")),
     "results.after.test.score.macro_f1"),
    (lambda m: m["results"]["after"]["test"]["score"].pop("accuracy"), "results.after.test.score.accuracy"),
    (lambda m: m["results"]["after"]["test"].update(score=[]), "results.after.test.score"),
    (lambda m: m["results"]["before"]["test"]["score"]["confusion"].pop(), "results.before.test.score.confusion"),
    (lambda m: m["results"]["before"]["test"]["score"]["confusion"][0].pop(), "results.before.test.score.confusion"),
    (lambda m: m["results"]["before"]["test"]["score"]["per_class"].pop("neutral"),
     "results.before.test.score.per_class"),
    (lambda m: m["training"].update(rounds=[{"steps": 3}]), "training.rounds[0]"),
    (lambda m: m["training"].update(alpha="32"), "training.alpha"),
    (lambda m: m["environment"].update(device={"nested": 1}), "environment.device"),
    (lambda m: m.update(system_prompt="\ud800"), "system_prompt"),
]


@pytest.mark.parametrize("change, field", TAMPERED, ids=[field + f"-{i}" for i, (_, field) in enumerate(TAMPERED)])
def test_a_tampered_metrics_json_is_one_line_naming_the_file_and_field(tmp_path, capsys, change, field):
    from doratweet.cli import main

    make_run_dir(tmp_path / "run", tampered(change))
    assert main(["report", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"metrics.json: {field}" in err, err


@pytest.mark.parametrize("content, problem", [
    (b"[]", "expected a JSON object"),
    (b'"text"', "expected a JSON object"),
    (b'{"base_model_id": "caf\xe9"}', "not valid UTF-8"),
    (b"[" * 100_000, "invalid JSON"),
    (b'{"base_model_id": 1' + b"0" * 5000 + b"}", "invalid JSON"),
])
def test_a_metrics_json_that_is_not_an_object_of_text_is_one_line(tmp_path, capsys, content, problem):
    from doratweet.cli import main

    make_run_dir(tmp_path / "run")
    (tmp_path / "run" / "metrics.json").write_bytes(content)
    assert main(["report", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "metrics.json" in err and problem in err, err


@pytest.mark.parametrize("line, field", [('{"step": 10, "loss": "low"}', "loss"), ('{"step": "ten", "loss": 1.0}', "step"),
                                         ('{"step": 10, "val_macro_f1": null}', "val_macro_f1")])
def test_a_tampered_log_line_names_the_file_line_and_field(run_dir, line, field):
    (run_dir / "train_log.jsonl").write_text('{"step": 5, "loss": 2.0}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"train_log\.jsonl:2: {field}: "):
        write_report(run_dir)


def test_an_adapter_config_that_is_not_an_object_is_one_line(run_dir):
    (run_dir / "adapter" / "adapter_config.json").write_text("[]")
    with pytest.raises(UserError, match=r"adapter_config\.json: expected a JSON object"):
        write_report(run_dir)


def test_metrics_keep_their_values_through_the_reader(run_dir):
    metrics = load_metrics(run_dir)
    assert metrics["results"]["after"]["test"]["score"]["macro_f1"] == AFTER_SCORE["macro_f1"]
    assert metrics["training"]["targets"] == METRICS["training"]["targets"]
    assert metrics["examples"] == METRICS["examples"]


def json_paths(value, prefix=()):
    yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from json_paths(child, (*prefix, key))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats() | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                             children, max_size=3),
                           max_leaves=6)


@given(data=st.data())
@settings(max_examples=25, deadline=None, derandomize=os.environ.get("CI") == "true",
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_any_field_of_metrics_json_set_to_any_value_gives_a_card_or_one_line(tmp_path, data):
    path = data.draw(st.sampled_from(list(json_paths(METRICS))[1:]), label="path")
    metrics = copy.deepcopy(METRICS)
    parent = metrics
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = data.draw(JSON_VALUES, label="value")
    folder = make_run_dir(tmp_path / f"run-{abs(hash(path))}", metrics, log=[])
    try:
        assert write_report(folder).is_file()
    except UserError as error:
        assert "\n" not in str(error) and "metrics.json" in str(error)


LOCAL_METRICS = {**METRICS, "base_model_id": "/home/me/models/tiny-llama",
                 "model_source": "/home/me/.cache/doratweet/models/tiny-llama",
                 "data": {**METRICS["data"], "spec": "train=/home/me/data/a.csv,test=/home/me/data/b.csv"}}


def test_a_card_from_a_local_model_folder_has_no_base_model_and_no_local_path(tmp_path):
    card = (write_report(make_run_dir(tmp_path / "run", LOCAL_METRICS))).read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front
    assert "/home/me" not in card
    assert "tiny-llama" in card and "train=a.csv,test=b.csv" in card


def test_a_card_from_a_hub_model_names_it_as_base_model(card):
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_report_never_writes_through_a_plots_folder_that_is_a_link(run_dir, tmp_path):
    elsewhere = tmp_path / "my-plots"
    elsewhere.mkdir()
    (elsewhere / "training_curves.png").write_text("my drawing")
    (run_dir / "plots").symlink_to(elsewhere)
    with pytest.raises(UserError, match=r"plots: is a link .*never writes through a link"):
        write_report(run_dir)
    assert (elsewhere / "training_curves.png").read_text() == "my drawing"
    assert not (run_dir / "README.md").exists()


def test_report_refuses_a_readme_that_is_a_link(run_dir, tmp_path):
    elsewhere = tmp_path / "notes.md"
    elsewhere.write_text("---\ntags: [doratweet]\n---\nmine\n")
    (run_dir / "README.md").symlink_to(elsewhere)
    with pytest.raises(UserError, match=r"README.md: is a link"):
        write_report(run_dir)
    assert elsewhere.read_text() == "---\ntags: [doratweet]\n---\nmine\n"


def test_report_replaces_a_plot_only_when_it_is_a_png(run_dir):
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "per_class_f1.png").write_text("my notes")
    with pytest.raises(UserError, match=r"per_class_f1.png: does not hold what doratweet writes there"):
        write_report(run_dir)
    assert (run_dir / "plots" / "per_class_f1.png").read_text() == "my notes"
    assert not (run_dir / "plots" / "training_curves.png").exists()


def test_report_refuses_a_metrics_json_that_links_out_of_the_run_folder(run_dir, tmp_path):
    outside = tmp_path / "metrics-elsewhere.json"
    (run_dir / "metrics.json").rename(outside)
    (run_dir / "metrics.json").symlink_to(outside)
    with pytest.raises(UserError, match=r"metrics.json: a link to .*outside the run folder"):
        write_report(run_dir)
