"""`doratweet run` end to end on a tiny model, and the verbs that use its run folder."""

import io
import json
import shutil

import pytest
import yaml

from doratweet import SentimentClassifier
from doratweet.errors import UserError
from doratweet.cli import build_parser, main


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    code = main(["--quiet", "run", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--out", str(out),
                 "--max-steps", "6", "--rank", "4", "--alpha", "8", "--batch-size", "4", "--lr", "1e-2"])
    assert code == 0
    return out


def test_run_writes_the_whole_run_folder(run_dir):
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.json",
                 "predictions/test_before.txt", "predictions/test_after.txt", "train_log.jsonl", "README.md",
                 "plots/confusion_before.png", "plots/confusion_after.png", "plots/training_curves.png",
                 "plots/per_class_f1.png"):
        assert (run_dir / name).is_file(), name


def test_metrics_hold_before_and_after_in_both_modes(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for stage in ("before", "after"):
        for mode in ("score", "generate"):
            m = metrics["results"][stage]["test"][mode]
            assert m["mode"] == mode and m["n"] == 6
            assert {"macro_f1", "macro_recall", "accuracy", "macro_f1_4class", "per_class", "confusion"} <= set(m)
    assert len(metrics["examples"]) == 5
    assert metrics["training"]["steps"] == 6


def test_predictions_are_one_label_id_per_test_tweet(run_dir):
    lines = (run_dir / "predictions" / "test_after.txt").read_text().splitlines()
    assert len(lines) == 6 and set(lines) <= {"0", "1", "2"}


def test_model_card_has_valid_front_matter_and_the_sections(run_dir):
    card = (run_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft"
    for heading in ("## How to use", "## Training details", "## Results", "## Examples", "## Plots"):
        assert heading in card


def test_python_api_predicts_labels_and_probabilities(run_dir):
    clf = SentimentClassifier.load(run_dir)
    probabilities = clf.predict_proba(["great day", "awful day"])
    assert [set(p) for p in probabilities] == [{"negative", "neutral", "positive"}] * 2
    assert all(abs(sum(p.values()) - 1) < 1e-5 for p in probabilities)
    assert clf.predict(["great day", "awful day"]) == [max(p, key=p.get) for p in probabilities]


def test_unmerged_and_merged_classifiers_agree(run_dir):
    """Both fp32: merging changes only the order of float32 sums (~1e-6 on a probability, on any CPU); a merge
    that dropped the magnitude or the scale would move them by more than 1e-2. 1e-4 sits between."""
    merged = SentimentClassifier.load(run_dir, bf16=False).predict_proba(["so happy today"])[0]
    unmerged = SentimentClassifier.load(run_dir, merge=False).predict_proba(["so happy today"])[0]
    assert all(abs(merged[k] - unmerged[k]) < 1e-4 for k in merged)


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_predict_reads_each_input_format(run_dir, tmp_path, suffix, capsys):
    texts = ["great day", "awful day", "meeting at 5"]
    path = tmp_path / f"in{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(texts) + "\n")
    elif suffix == ".csv":
        path.write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(texts)))
    else:
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out.jsonl"
    assert main(["--quiet", "predict", "--run", str(run_dir), "--input", str(path), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == texts
    assert all(r["label"] in ("negative", "neutral", "positive") for r in rows)


def test_predict_reads_arguments_and_stdin(run_dir, monkeypatch, capsys):
    assert main(["--quiet", "predict", "--run", str(run_dir), "great day", "--format", "jsonl"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "great day"
    monkeypatch.setattr("sys.stdin", io.StringIO("first tweet\nsecond tweet\n"))
    assert main(["--quiet", "predict", "--run", str(run_dir), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("text,label,p_negative")


def test_evaluate_writes_metrics_and_tweeteval_predictions(run_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["--quiet", "evaluate", "--adapter", str(run_dir), "--data", str(tiny_data_dir), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 6 and metrics["mode"] == "score"
    assert len((tmp_path / "eval.predictions.txt").read_text().splitlines()) == 6


def test_merge_writes_a_plain_model_that_predicts_the_same(run_dir, tmp_path):
    merged = tmp_path / "merged"
    assert main(["--quiet", "merge", "--adapter", str(run_dir), "--out", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(merged) is not None
    assert main(["--quiet", "merge", "--adapter", str(run_dir), "--out", str(merged)]) == 2  # never overwrites


def test_report_rebuilds_the_card(run_dir):
    before = (run_dir / "README.md").read_text()
    (run_dir / "README.md").unlink()
    assert main(["--quiet", "report", str(run_dir)]) == 0
    assert (run_dir / "README.md").read_text() == before


def test_run_refuses_a_non_empty_out_folder(run_dir, tiny_model_dir, tiny_data_dir, capsys):
    code = main(["--quiet", "run", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_unknown_model_is_one_clear_line(tiny_data_dir, tmp_path, capsys):
    code = main(["--quiet", "run", "--model", "no-such-org/no-such-model", "--data", str(tiny_data_dir),
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no-such-org/no-such-model" in err


@pytest.mark.parametrize("verb", ["run", "train", "evaluate", "predict", "report", "merge"])
def test_every_option_in_help_states_its_default(verb):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[verb]
    for action in sub._actions:
        if action.option_strings and action.dest != "help" and not action.required:
            assert "default" in (action.help or ""), f"{verb} {action.option_strings}"


def run_args(model_dir, data_dir, out, *extra):
    return ["--quiet", "run", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            "--max-steps", "2", "--rank", "4", "--alpha", "8", "--batch-size", "4", *extra]


def test_run_overwrite_never_replaces_a_users_readme(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("# My project\n\nNotes I keep here.\n")
    assert main(run_args(tiny_model_dir, tiny_data_dir, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "README.md does not hold what doratweet writes there" in err and err.count("\n") == 1
    assert (out / "README.md").read_text() == "# My project\n\nNotes I keep here.\n"
    assert [p.name for p in out.iterdir()] == ["README.md"]


def test_report_never_replaces_a_readme_it_did_not_write(tiny_run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    (run / "README.md").write_text("# My own notes\n")
    assert main(["--quiet", "report", str(run)]) == 2
    assert "README.md: does not hold what doratweet writes there" in capsys.readouterr().err
    assert (run / "README.md").read_text() == "# My own notes\n"


def test_a_card_the_user_edited_is_neither_rebuilt_nor_overwritten(tiny_run_dir, tiny_model_dir, tiny_data_dir,
                                                                  tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    assert main(["--quiet", "report", str(run)]) == 0  # doratweet's own card, unchanged: rebuilt
    with (run / "README.md").open("a") as card:
        card.write("\nMy notes on this run.\n")
    edited = (run / "README.md").read_text()
    assert main(["--quiet", "report", str(run)]) == 2
    assert "README.md: does not hold what doratweet writes there, or was changed since" in capsys.readouterr().err
    assert main(run_args(tiny_model_dir, tiny_data_dir, run, "--overwrite")) == 2
    assert capsys.readouterr().err.count("\n") == 1 and (run / "README.md").read_text() == edited


def test_overwrite_replaces_a_previous_run_whole_and_its_checkpoints_cannot_be_resumed(
        tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    assert main(run_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "4", "--save-every", "2")) == 0
    (out / "round-1").mkdir()  # as a run in rounds leaves it
    for name in ("adapter", "checkpoint"):
        shutil.copytree(out / name, out / "round-1" / name)
    shutil.copy(out / "train_log.jsonl", out / "round-1")
    (out / "round-1" / "train_summary.json").write_text(json.dumps({"steps": 4}))
    (out / "notes.txt").write_text("mine")
    assert main(["--quiet", "train", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--out", str(out),
                 "--max-steps", "1", "--rank", "4", "--alpha", "8", "--batch-size", "4", "--save-every", "1",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint", "notes.txt", "train_log.jsonl",
                                                      "train_summary.json"]  # the old card, metrics, plots are gone
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["step-00000001"]
    assert (out / "notes.txt").read_text() == "mine"


def test_evaluate_never_replaces_a_file_it_did_not_write(tiny_run_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = ["--quiet", "evaluate", "--adapter", str(tiny_run_dir), "--data", str(tiny_data_dir), "--out", str(out)]
    out.write_text("my own results\n")
    assert main(args) == 2
    assert "results.json: does not hold what doratweet writes there" in capsys.readouterr().err
    assert out.read_text() == "my own results\n"
    out.unlink()
    (tmp_path / "results.predictions.txt").write_text("my notes\n")
    assert main(args) == 2
    assert "results.predictions.txt: does not hold" in capsys.readouterr().err
    assert (tmp_path / "results.predictions.txt").read_text() == "my notes\n" and not out.exists()
    (tmp_path / "results.predictions.txt").unlink()
    assert main(args) == 0 and main(args) == 0  # its own output it replaces


def test_run_resume_refuses_a_users_readme_before_any_work(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(tiny_model_dir, tiny_data_dir, out, "--save-every", "1")) == 0
    metrics = (out / "metrics.json").read_text()
    (out / "README.md").write_text("# Notes on this run\n")
    assert main(run_args(tiny_model_dir, tiny_data_dir, out, "--save-every", "1", "--resume")) == 2
    assert "README.md: does not hold what doratweet writes there" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "# Notes on this run\n"
    assert (out / "metrics.json").read_text() == metrics  # refused before evaluating anything


def test_overwrite_removes_what_a_killed_run_leaves_half_written(tiny_run_dir, tmp_path):
    from doratweet.run_folder import remove_previous_run

    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir, out)
    (out / ".metrics.json.tmp").write_text("{")  # killed while writing metrics.json
    half = out / "checkpoint" / ".step-00000004.tmp"  # killed while writing a checkpoint
    half.mkdir(parents=True)
    shutil.copy(out / "adapter" / "adapter_model.safetensors", half / "tensors.safetensors")
    (out / ".round-1.trash").mkdir()  # killed while an earlier --overwrite removed a round
    (out / "notes.txt").write_text("mine")
    remove_previous_run(out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_overwrite_never_follows_a_link_out_of_the_run_folder(tiny_run_dir, tmp_path, capsys):
    from doratweet.run_folder import remove_previous_run

    elsewhere = tmp_path / "my-checkpoints"
    shutil.copytree(tiny_run_dir / "adapter", elsewhere)
    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir, out)
    shutil.rmtree(out / "adapter")
    (out / "adapter").symlink_to(elsewhere)
    with pytest.raises(UserError, match=r"adapter/? is a link, and --overwrite replaces only"):
        remove_previous_run(out)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_resume_refuses_a_folder_of_the_run_that_is_a_link_before_writing(tiny_run_dir, tmp_path):
    from doratweet.run_folder import check_out_dir

    elsewhere = tmp_path / "my-plots"
    elsewhere.mkdir()
    (elsewhere / "training_curves.png").write_text("my drawing")
    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir, out)
    (out / "checkpoint" / "step-00000002").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "plots")
    (out / "plots").symlink_to(elsewhere)
    with pytest.raises(UserError, match=r"plots: is a link .*never writes through a link"):
        check_out_dir(out, overwrite=False, resume=True)
    assert (elsewhere / "training_curves.png").read_text() == "my drawing"


@pytest.mark.parametrize("name, make", [
    (".checkpoint.trash", lambda path: (path.mkdir(), (path / "backup.txt").write_text("mine"))),
    (".round-1.trash", lambda path: (path.mkdir(), (path / "thesis.tex").write_text("mine"))),
    (".README.md.mine.tmp", lambda path: path.write_text("mine")),
    (".metrics.json.backup.tmp", lambda path: path.write_text("mine")),
])
def test_overwrite_refuses_a_leftover_name_holding_what_no_run_wrote(tiny_run_dir, tmp_path, name, make):
    from doratweet.run_folder import remove_previous_run

    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir, out)
    make(out / name)
    with pytest.raises(UserError, match=rf"{name.replace('.', '[.]')}\S* is .*--overwrite replaces only what"):
        remove_previous_run(out)
    assert (out / name).exists() and (out / "adapter").is_dir()


def test_overwrite_removes_leftovers_named_as_an_atomic_write_makes_them(tiny_run_dir, tmp_path):
    from doratweet.files import atomic_path
    from doratweet.run_folder import remove_previous_run

    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir, out)
    with pytest.raises(KeyboardInterrupt), atomic_path(out / "README.md") as tmp:
        leftover = tmp.with_name(tmp.name.replace("README", "metrics").replace(".md.", ".json."))
        leftover.write_text("{")
        raise KeyboardInterrupt
    trash = out / ".checkpoint.trash" / "step-00000002"
    shutil.copytree(out / "adapter", trash)
    (trash / "adapter_config.json").rename(trash / "state.json")
    (trash / "adapter_model.safetensors").rename(trash / "tensors.safetensors")
    (out / "notes.txt").write_text("mine")
    remove_previous_run(out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_writing_a_run_file_never_writes_through_a_link_at_its_temporary_name(tmp_path):
    from doratweet.run_folder import write_json, write_label_ids

    mine = tmp_path / "mine.txt"
    mine.write_text("my notes")
    out = tmp_path / "run"
    (out / "predictions").mkdir(parents=True)
    (out / ".metrics.json.tmp").symlink_to(mine)
    (out / "predictions" / ".test_after.txt.tmp").symlink_to(mine)
    write_json(out / "metrics.json", {"steps": 2})
    write_label_ids(out / "predictions" / "test_after.txt", [0, 2])
    assert mine.read_text() == "my notes"
    assert json.loads((out / "metrics.json").read_text()) == {"steps": 2}
    assert (out / "predictions" / "test_after.txt").read_text() == "0\n2\n"
