"""Mistakes on the command line: one line naming the option and the fix, a non-zero exit, nothing written."""

import shutil

import pytest
from helpers import TWEETS

from doratweet.cli import main
from doratweet.predict import SentimentClassifier


def run_args(model_dir, data_dir, out, *extra):
    return ["--quiet", "run", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            "--max-steps", "1", "--rank", "4", "--alpha", "8", "--batch-size", "4", *extra]


def exit_code(args) -> int:
    """What the `doratweet` command exits with: main's return value, or argparse's exit for a malformed option."""
    try:
        return main(args)
    except SystemExit as exit:
        return exit.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("doratweet"), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("option, value, message", [
    ("--rank", "0", "--rank 0: must be 1 or more"),
    ("--alpha", "-8", "--alpha -8.0: must be a positive number"),
    ("--alpha", "nan", "--alpha nan: must be a positive number"),
    ("--alpha", "1e308", "--alpha 1e+308: must be a positive number, at most 100000"),
    ("--alpha", "inf", "--alpha inf: must be a positive number, at most 100000"),
    ("--weight-decay", "inf", "--weight-decay inf: must be in [0, 1]"),
    ("--weight-decay", "1e308", "--weight-decay 1e+308: must be in [0, 1]"),
    ("--epochs", "1e308", "--epochs 1e+308: must be positive, at most 1000000"),
    ("--lr", "0", "--lr 0.0: must be in (0, 1)"),
    ("--lr", "3", "--lr 3.0: must be in (0, 1)"),
    ("--batch-size", "0", "--batch-size 0: must be 1 or more"),
    ("--grad-accum", "-1", "--grad-accum -1: must be 1 or more"),
    ("--dropout", "1.5", "--dropout 1.5: must be in [0, 1)"),
    ("--epochs", "0", "--epochs 0.0: must be positive"),
    ("--warmup-ratio", "2", "--warmup-ratio 2.0: must be in [0, 1)"),
    ("--label-smoothing", "-0.1", "--label-smoothing -0.1: must be in [0, 1)"),
    ("--method", "ia3", "--method ia3: choose dora or lora"),
    ("--targets", "q_proj,qkv", "--targets: unknown module name(s) qkv; this model's linear modules are:"),
    ("--eval-batch-size", "0", "argument --eval-batch-size: must be 1 or more"),
    ("--train-limit", "-5", "argument --train-limit: must be 1 or more"),
    ("--rank", "sixteen", "argument --rank: invalid int value: 'sixteen'"),
    ("--preset", "fastest", "argument --preset: invalid choice: 'fastest'"),
    ("--targets", "lm_head", "--targets lm_head: the output head cannot be adapted"),
    ("--targets", "embed_tokens", "--targets embed_tokens: is an Embedding, not a linear layer"),
    ("--targets", "act_fn", "--targets act_fn: is a SiLU"),
    ("--rank", "100000", "--rank 100000: larger than the adapted layers allow (at most 32"),
    ("--rank", "33", "--rank 33: larger than the adapted layers allow (at most 32"),
    ("--seed", "1180591620717411303424", "--seed 1180591620717411303424: must be a whole number from 0 to"),
    ("--seed", "-1", "--seed -1: must be a whole number from 0 to"),
    ("--grad-accum", "100000000000000000000", "--grad-accum 100000000000000000000: must be at most"),
    ("--max-steps", "100000000000000000000", "--max-steps 100000000000000000000: must be at most"),
    ("--eval-every", "100000000000000000000", "--eval-every 100000000000000000000: must be at most"),
    ("--test-limit", "100000000000000000000", "argument --test-limit: must be at most"),
])
def test_an_invalid_option_is_one_line_and_writes_nothing(option, value, message, tiny_model_dir, tiny_data_dir,
                                                          tmp_path, capsys):
    out = tmp_path / "run"
    assert exit_code(run_args(tiny_model_dir, tiny_data_dir, out, option, value)) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_an_existing_out_folder_is_refused_and_kept(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(run_args(tiny_model_dir, tiny_data_dir, out)) == 2
    assert "the folder exists and is not empty; pass --overwrite" in one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_overwrite_and_resume_together_are_refused(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    assert main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", "--overwrite", "--resume")) == 2
    assert "--overwrite and --resume: choose one" in one_error_line(capsys)


def tweeteval_copy(tiny_data_dir, tmp_path, file, content: bytes):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    (data / file).write_bytes(content)
    return data


def csv_data(tmp_path, rows: str):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("id,text,label\n" + rows)
    return tmp_path / "data"


N = len(TWEETS)
DATA_FAULTS = {
    "label outside the mapping": (lambda d, t: tweeteval_copy(d, t, "train_labels.txt", b"0\n" * (N - 1) + b"7\n"),
                                  f"train_labels.txt:{N}: unknown label '7'"),
    "empty file": (lambda d, t: tweeteval_copy(d, t, "train_text.txt", b""), "train_text.txt: the file is empty"),
    "count mismatch": (lambda d, t: tweeteval_copy(d, t, "train_labels.txt", b"0\n" * (N - 2)), "train_labels.txt"),
    "undecodable bytes": (lambda d, t: tweeteval_copy(d, t, "train_text.txt", b"ok\n" * 3 + b"caf\xe9\n" * (N - 3)),
                          "train_text.txt:4: not valid UTF-8"),
    "a 1 MB tweet": (lambda d, t: tweeteval_copy(d, t, "train_text.txt", b"ok\n" + b"x" * 1_000_000 + b"\n"
                                                 + b"ok\n" * (N - 2)), "train_text.txt:2: text is 1,000,000 characters"),
    "missing column": (lambda d, t: csv_data(t, "1,good,positive\n").joinpath("train.csv").write_text(
        "id,tweet,label\n1,good,positive\n") and t / "data", "no column 'text'"),
    "duplicate ids": (lambda d, t: csv_data(t, "1,good,positive\n1,bad,negative\n"),
                      "train.csv:3: duplicate id '1', first used on"),
    "missing data path": (lambda d, t: t / "nowhere", "nowhere"),
}


@pytest.mark.parametrize("fault", DATA_FAULTS)
def test_bad_data_is_one_line_with_the_file_and_leaves_no_out_folder(fault, tiny_model_dir, tiny_data_dir, tmp_path,
                                                                     capsys):
    make_data, expected = DATA_FAULTS[fault]
    data = make_data(tiny_data_dir, tmp_path)
    out = tmp_path / "run"
    assert main(["--quiet", "train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]) == 2
    assert expected in one_error_line(capsys)
    assert not out.exists()


def test_debug_shows_the_traceback(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    assert main(["--debug", *run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", "--rank", "0")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("--rank 0: must be 1 or more")


def test_an_unexpected_failure_is_one_line_pointing_at_debug(tmp_path, capsys, monkeypatch):
    import doratweet.report

    def broken(run_dir):
        raise RuntimeError("disk quota exceeded\nmore details")

    monkeypatch.setattr(doratweet.report, "write_report", broken)
    assert main(["report", str(tmp_path)]) == 1
    assert "RuntimeError: disk quota exceeded (rerun with --debug" in one_error_line(capsys)


@pytest.mark.slow
def test_a_model_without_a_chat_template_trains_and_predicts_with_the_plain_fallback(
        tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    import json

    model_dir = tmp_path / "plain-model"
    shutil.copytree(tiny_model_dir, model_dir)
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    caplog.set_level("WARNING")
    assert main(run_args(model_dir, tiny_data_dir, tmp_path / "run")) == 0
    assert "has no chat template; using doratweet's plain fallback" in caplog.text
    classifier = SentimentClassifier.load(tmp_path / "run", model=str(model_dir))
    assert classifier.prompt_format.suffix == "\nSentiment:"
    assert len(classifier.predict(["what a lovely day"])) == 1


def test_the_duplicate_id_check_follows_id_column(tiny_model_dir, tmp_path, capsys):
    data = csv_data(tmp_path, "1,good,positive\n1,bad,negative\n")
    args = ["--quiet", "train", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--id-column", "text"]) == 0  # texts differ: no duplicate
    assert main([*args, "--out", str(tmp_path / "b"), "--id-column", ""]) == 0  # check off
    assert main([*args, "--out", str(tmp_path / "c")]) == 2  # the default column 'id' repeats
    assert "duplicate id '1'" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_runs_the_same_command_and_keeps_its_exit_status(tmp_path):
    # `python -m doratweet` is how the GPU script runs the package from PYTHONPATH, uninstalled.
    import subprocess
    import sys

    version = subprocess.run([sys.executable, "-m", "doratweet", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("doratweet ")
    missing = subprocess.run([sys.executable, "-m", "doratweet", "evaluate", "--data", str(tmp_path / "none")],
                             capture_output=True, text=True)
    assert missing.returncode != 0
    assert len(missing.stderr.strip().splitlines()) == 1 and "none" in missing.stderr


def train_args(model_dir, data_dir, out, *extra):
    return ["--quiet", "train", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            "--max-steps", "1", "--rank", "4", "--alpha", "8", "--batch-size", "4", *extra]


def test_overwrite_refuses_folders_it_did_not_make_and_keeps_them(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    home = tmp_path / "home"
    (home / "checkpoint").mkdir(parents=True)
    (home / "round-1").mkdir()
    (home / "checkpoint" / "thesis.tex").write_text("thesis")
    assert main(train_args(tiny_model_dir, tiny_data_dir, home, "--overwrite")) == 2
    assert "checkpoint/thesis.tex is not a file doratweet writes there" in one_error_line(capsys)
    assert sorted(p.name for p in home.iterdir()) == ["checkpoint", "round-1"]
    assert (home / "checkpoint" / "thesis.tex").read_text() == "thesis"


def test_overwrite_refuses_an_empty_folder_under_a_name_doratweet_uses(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                        capsys):
    home = tmp_path / "home"
    (home / "round-1").mkdir(parents=True)
    assert main(train_args(tiny_model_dir, tiny_data_dir, home, "--overwrite")) == 2
    assert "round-1/ is an empty folder" in one_error_line(capsys)
    assert (home / "round-1").is_dir()


def test_overwrite_leaves_files_under_other_names_alone(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "train.csv").write_text("id,text,label\n")
    assert main(train_args(tiny_model_dir, tiny_data_dir, out, "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "train.csv").read_text() == "id,text,label\n"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_every_target_an_error_lists_can_be_adapted(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from helpers import build_tiny_model

    from doratweet.adapters import add_adapters
    from doratweet.adapters.inject import adapter_modules

    assert main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", "--targets", "qkv")) == 2
    listed = one_error_line(capsys).rstrip().rsplit("are: ", 1)[1].split(", ")
    assert "lm_head" not in listed and "q_proj" in listed
    model, tokenizer = build_tiny_model()
    add_adapters(model, method="dora", rank=4, alpha=8, targets=tuple(listed))
    assert {name.rsplit(".", 1)[1] for name in adapter_modules(model)} == set(listed)
    assert model(**tokenizer(["good day"], return_tensors="pt")).logits.isfinite().all()


def test_a_target_pattern_never_wraps_the_output_head():
    from helpers import build_tiny_model

    from doratweet.adapters import add_adapters
    from doratweet.adapters.inject import adapter_modules

    model, _ = build_tiny_model()
    add_adapters(model, method="lora", rank=4, alpha=8, targets=r".*")
    assert adapter_modules(model) and "lm_head" not in adapter_modules(model)


def test_the_largest_rank_the_layers_allow_is_accepted(tiny_model_dir, tiny_data_dir, tmp_path):
    # k_proj and v_proj map 64 features to 32 (2 key-value heads of 16) in the tiny model
    assert main(train_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", "--rank", "32")) == 0


def test_the_first_line_of_an_error_is_its_message_up_to_the_first_newline_or_empty():
    from doratweet.errors import first_line

    assert first_line(RuntimeError("  disk full\n  at write()\n")) == "disk full"
    assert first_line(RuntimeError("")) == "" and first_line(RuntimeError("\n\n")) == ""  # was an IndexError in push
    assert first_line(ValueError("x" * 500), 200) == "x" * 200


@pytest.mark.parametrize("verb", ["train", "run", "export"])
@pytest.mark.parametrize("obstacle", ["dangling link", "parent is a file"])
def test_an_out_that_cannot_be_made_is_one_line_before_any_work(tiny_model_dir, tiny_data_dir, tiny_run_dir, tmp_path,
                                                                 capsys, verb, obstacle):
    if obstacle == "dangling link":
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "gone")
        expected = f"--out {out}: a link to {tmp_path / 'gone'}, which does not exist"
    else:
        (tmp_path / "afile").write_text("mine")
        out = tmp_path / "afile" / "sub"
        expected = f"--out {out}: {tmp_path / 'afile'} is a file, not a folder"
    if verb == "export":
        args = ["--quiet", "export", "--adapter", str(tiny_run_dir), "--format", "hf", "--out", str(out)]
    else:
        args = [*run_args(tiny_model_dir, tiny_data_dir, out)]
        args[1] = verb
    assert exit_code(args) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "gone").exists() and (obstacle != "parent is a file" or (tmp_path / "afile").read_text() == "mine")


def test_a_training_stopped_before_it_wrote_anything_leaves_no_empty_out(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                           monkeypatch):
    import doratweet.commands

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the frozen-layer cache is built, before anything is written

    monkeypatch.setattr(doratweet.commands, "train", stopped)
    args = run_args(tiny_model_dir, tiny_data_dir, tmp_path / "new")
    args[1] = "train"
    assert main(args) == 130
    assert not (tmp_path / "new").exists()


def test_no_cache_frozen_says_what_it_turns_off():
    from doratweet.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    (action,) = [a for a in train._actions if "--no-cache-frozen" in a.option_strings]
    assert action.help.startswith("with --layers: run the frozen layers below the adapters at every step, instead")
    assert action.help.endswith("(default: off)")
