"""`doratweet tune`: the search-space file, the study (trials are train runs, scored on validation and held-out
tweets, pruned, resumed, shared by two workers) and what it leaves (leaderboard, plots, the best adapter)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers import TWEETS

from doratweet.cli import main
from doratweet.config import RunConfig
from doratweet.errors import UserError
from doratweet.search_space import read_search_space

SPACE = """\
lr: {low: 1e-4, high: 1.0e-2, log: true}    # 1e-4 without a dot: YAML reads a string, taken as the number
rank: {choices: [2, 4]}
alpha: 8
rslora: {choices: [false, true]}
class-weighted: {choices: [false, true]}
label_smoothing: {low: 0.0, high: 0.2}
batch_size: {low: 2, high: 4, step: 2}
system_prompt: {choices: ["Label the sentiment.", "You classify tweets."]}
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """TweetEval's layout with 24 train tweets (6 of them held out by the tests) and no test split at all: a study
    must never need it."""
    folder = tmp_path_factory.mktemp("tune-data")
    (folder / "mapping.txt").write_text("0\tnegative\n1\tneutral\n2\tpositive\n")
    for split, rows in (("train", TWEETS * 2), ("val", TWEETS[:6])):
        (folder / f"{split}_text.txt").write_text("".join(t + "\n" for t, _ in rows))
        (folder / f"{split}_labels.txt").write_text("".join(f"{y}\n" for _, y in rows))
    return folder


def write_space(tmp_path, text=SPACE, name="space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def tune_args(model, data, space, out, *more):
    return ["--quiet", "tune", "--model", str(model), "--data", str(data), "--space", str(space), "--out", str(out),
            "--holdout", "6", "--eval-every-tweets", "8", "--epochs", "2", *map(str, more)]


# --- the search-space file ----------------------------------------------------------------------------------------

def test_a_space_reads_ranges_choices_and_fixed_values_as_the_options_types(tmp_path):
    space = read_search_space(write_space(tmp_path), RunConfig(out=tmp_path, model="m"))
    by_key = {d.key: d for d in space.dimensions}
    assert by_key["lr"].low == 1e-4 and by_key["lr"].high == 0.01 and by_key["lr"].log
    assert by_key["rank"].choices == (2, 4) and by_key["alpha"].fixed and by_key["alpha"].value == 8.0
    assert by_key["rslora"].option.field == "use_rslora"
    assert by_key["class-weighted"].option.field == "class_weighted"
    assert by_key["batch_size"].step == 2 and by_key["system_prompt"].option.owner == "run"
    trial = optuna.create_study().ask()
    values = space.suggest(trial)
    run = space.apply(values, RunConfig(out=tmp_path, model="m"))
    assert run.train.adapter.rank == values["rank"] and run.train.adapter.use_rslora == values["rslora"]
    assert run.train.lr == values["lr"] and run.train.batch_size in (2, 4) and run.train.adapter.alpha == 8.0
    assert run.system_prompt == values["system_prompt"] and run.train.class_weighted == values["class-weighted"]


def test_options_the_command_line_reads_from_text_are_written_as_that_text(tmp_path):
    path = write_space(tmp_path, "targets: {choices: ['q_proj,v_proj', [o_proj, up_proj]]}\ntrain_precision: bf16\n")
    space = read_search_space(path, RunConfig(out=tmp_path, model="m"))
    run = space.apply({"targets": "q_proj,v_proj", "train_precision": "bf16"}, RunConfig(out=tmp_path, model="m"))
    assert run.train.adapter.targets == ("q_proj", "v_proj") and run.train.bf16 is True
    assert space.dimensions[0].choices == ("q_proj,v_proj", "o_proj,up_proj")


@pytest.mark.parametrize("text, message", [
    ("lr: [1, 2\n", "line 2: not valid YAML"),
    ("- lr\n", "must be a YAML mapping"),
    ("learning_rate: 0.001\n", "learning_rate: not an option tune can search"),
    ("eval_every: 10\n", "eval_every: not an option tune can search"),
    ("cache_frozen: {choices: [true, false]}\n", "cache_frozen: not an option tune can search"),
    ("lr: {low: 0.01, high: 0.001}\n", "lr: low (0.01) must be below high (0.001)"),
    ("lr: {low: 0, high: 0.01, log: true}\n", "lr: a log-scaled range needs low above 0"),
    ("lr: {low: 0.001}\n", "lr: a range needs both low and high"),
    ("lr: {choices: []}\n", "lr: choices must be a non-empty list"),
    ("lr: {choices: [0.001, 0.001]}\n", "lr: a choice is listed twice"),
    ("lr: {low: 0.001, high: 2}\n", "lr: 2.0: --lr 2.0: must be in (0, 1)"),
    ("rank: {low: 2, high: 8.5}\n", "rank: high: 8.5 is not a whole number"),
    ("rslora: {low: 0, high: 1}\n", "rslora: a bool option takes choices"),
    ("lr: {low: 0.001, high: 0.01, spread: 2}\n", "lr: unknown key 'spread'"),
    ("rslora: true\nuse_rslora: false\n", "use_rslora: the same option as rslora"),
    ("dropout: {choices: [0.1, high]}\n", "dropout: choice 2: 'high' is not a number"),
    ("system_prompt: {choices: ['']}\n", "system_prompt: choice 1: '' is not a non-empty text"),
    ("rank: 2\nlr: 0.001\nrank: 4\n", "line 3: rank is given twice"),
    ("rank: {low: 2, high: 3, step: 5}\n", "rank: step 5 is wider than the range 2 to 3"),
    ("train_precision: {choices: [bf16, bf17]}\n", "train_precision: 'bf17': invalid choice"),
])
def test_a_bad_space_is_one_line_naming_the_key(tmp_path, text, message):
    path = write_space(tmp_path, text)
    with pytest.raises(UserError) as err:
        read_search_space(path, RunConfig(out=tmp_path, model="m"))
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


# --- a study ------------------------------------------------------------------------------------------------------

def test_a_study_runs_trials_as_train_runs_and_leaves_a_leaderboard_plots_and_the_best_adapter(
        tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "study"
    assert main(tune_args(tiny_model_dir, data_dir, write_space(tmp_path), out, "--trials", 3)) == 0
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert len(rows) == 3 and {r["state"] for r in rows} == {"complete"}
    assert [float(r["value"]) for r in rows] == sorted((float(r["value"]) for r in rows), reverse=True)
    for row in rows:  # each trial a train folder, scored as the mean of validation and held-out macro-F1
        folder = Path(row["folder"])
        assert folder.parent == out / "trials" and (folder / "adapter" / "adapter_model.safetensors").is_file()
        trial = json.loads((folder / "trial.json").read_text())
        assert trial["value"] == pytest.approx((trial["val_macro_f1"] + trial["holdout_macro_f1"]) / 2)
        assert json.loads((folder / "train_summary.json").read_text())["best_val_macro_f1"] == trial["val_macro_f1"]
        log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
        batch = json.loads((folder / "train_summary.json").read_text())["batch_size"]
        assert [x["step"] for x in log if "val_macro_f1" in x][0] == 8 // batch  # every 8 tweets
    table = (out / "leaderboard.md").read_text()
    assert "3 trials (3 complete)" in table and table.count("\n| ") == 4
    for name in ("optimization_history.png", "intermediate_values.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    best = json.loads((out / "best" / "trial.json").read_text())
    assert best["value"] == max(float(r["value"]) for r in rows)
    card = (out / "best" / "README.md").read_text()
    assert card.startswith("---\n") and "doratweet" in card and "The test split was not read" in card
    labels = subprocess.run([sys.executable, "-m", "doratweet", "--quiet", "predict", "--adapter", str(out / "best"),
                             "--model", str(tiny_model_dir), "good day"], capture_output=True, text=True)
    assert labels.returncode == 0 and labels.stdout.strip()


def test_a_study_resumes_refuses_a_changed_space_and_will_not_start_over_a_folder(tiny_model_dir, data_dir, tmp_path):
    out, space = tmp_path / "study", write_space(tmp_path)
    assert main(tune_args(tiny_model_dir, data_dir, space, out, "--trials", 1)) == 0
    assert main(tune_args(tiny_model_dir, data_dir, space, out, "--trials", 2)) == 2  # exists: --resume needed
    assert main(tune_args(tiny_model_dir, data_dir, space, out, "--trials", 2, "--resume")) == 0
    assert len(list(csv.DictReader((out / "leaderboard.csv").open()))) == 2
    changed = write_space(tmp_path, SPACE.replace("rank: {choices: [2, 4]}", "rank: 4"))
    assert main(tune_args(tiny_model_dir, data_dir, changed, out, "--trials", 3, "--resume")) == 2
    assert main(tune_args(tiny_model_dir, data_dir, space, out, "--trials", 3, "--resume", "--holdout", 5)) == 2


def test_a_trial_stopped_by_ctrl_c_continues_from_its_checkpoint_on_resume(tiny_model_dir, data_dir, tmp_path,
                                                                            monkeypatch, capsys):
    out, space = tmp_path / "study", write_space(tmp_path, "lr: {low: 1.0e-3, high: 1.0e-2}\nbatch_size: 4\n")
    report = optuna.trial.Trial.report

    def ctrl_c_at_the_second_validation(self, value, step):
        report(self, value, step)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(optuna.trial.Trial, "report", ctrl_c_at_the_second_validation)
    assert main(tune_args(tiny_model_dir, data_dir, space, out, "--trials", 1)) == 130
    assert "checkpoint" in capsys.readouterr().err
    assert (out / "trials" / "0000" / "checkpoint" / "step-00000004").is_dir()
    monkeypatch.setattr(optuna.trial.Trial, "report", report)
    assert main(tune_args(tiny_model_dir, data_dir, space, out, "--trials", 1, "--resume")) == 0
    rows = {r["trial"]: r for r in csv.DictReader((out / "leaderboard.csv").open())}
    assert rows["0"]["state"] == "interrupted" and rows["1"]["state"] == "complete"
    assert rows["0"]["lr"] == rows["1"]["lr"] and rows["1"]["folder"] == str(out / "trials" / "0000")
    log = [json.loads(line) for line in (out / "trials" / "0000" / "train_log.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in log if "loss" in x]
    assert steps == sorted(set(steps))  # continued after step 4, nothing logged twice


def test_a_pruned_trial_is_counted_and_keeps_its_best_adapter(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    out = tmp_path / "study"
    assert main(tune_args(tiny_model_dir, data_dir, write_space(tmp_path), out, "--trials", 2)) == 0
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["state"] for r in rows] == ["pruned", "pruned"]
    for row in rows:
        trial = json.loads((Path(row["folder"]) / "trial.json").read_text())
        assert trial["state"] == "pruned" and "validation macro-F1" in trial["reason"]
        assert (Path(row["folder"]) / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "best").exists()  # no complete trial: nothing to call best


def test_two_workers_share_one_study_through_sqlite(tiny_model_dir, data_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    space = write_space(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    workers = [subprocess.Popen([sys.executable, "-m", "doratweet", *tune_args(
        tiny_model_dir, data_dir, space, tmp_path / f"worker{i}", "--trials", 4, "--storage", storage,
        "--study", "shared")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert 4 <= len(numbers) <= 5 and len(set(numbers)) == len(numbers)  # both may start a last trial at once
    owners = {Path(t.user_attrs["run_folder"]).parent.parent.name for t in study.trials}
    assert owners == {"worker1", "worker2"}
    for t in study.trials:  # every trial ran in its own worker's folder
        assert (Path(t.user_attrs["run_folder"]) / "trial.json").is_file()


def test_tune_mistakes_are_one_line(tiny_model_dir, data_dir, tmp_path, capsys):
    space = write_space(tmp_path)
    cases = [
        (tune_args(tiny_model_dir, data_dir, tmp_path / "none.yaml", tmp_path / "a"), "--space"),
        (tune_args(tiny_model_dir, data_dir, space, tmp_path / "b", "--holdout", 500), "--holdout 500"),
        (tune_args(tiny_model_dir, data_dir, space, tmp_path / "c", "--resume"), "--resume"),
        (tune_args(tiny_model_dir, data_dir, space, tmp_path / "d", "--storage", "nosuch://x"), "--storage"),
    ]
    for args, flag in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert flag in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_a_resumed_study_draws_new_values_and_refuses_other_training_options(tiny_model_dir, data_dir, tmp_path):
    out, space = tmp_path / "study", write_space(tmp_path, "lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    assert main(tune_args(tiny_model_dir, data_dir, space, out, "--trials", 2)) == 0
    assert main(tune_args(tiny_model_dir, data_dir, space, out, "--trials", 4, "--resume")) == 0
    lrs = [float(r["lr"]) for r in csv.DictReader((out / "leaderboard.csv").open())]
    assert len(set(lrs)) == 4  # not the first two again
    changed = tune_args(tiny_model_dir, data_dir, space, out, "--trials", 5, "--resume")
    changed[changed.index("--epochs") + 1] = "1"
    assert main(changed) == 2
    assert main(tune_args(tiny_model_dir, data_dir, space, tmp_path / "x", "--lr", "0.001")) == 2  # space sets lr


def test_refusals_before_any_trial_leave_no_folder_and_a_rerun_works(tiny_model_dir, data_dir, tmp_path, capsys):
    space = write_space(tmp_path)
    for more, message in ((["--storage", "notaurl"], "--storage notaurl"),
                          (["--storage", "sqlite://"], "in-memory"),
                          (["--study", ""], "--study ''")):
        assert main(tune_args(tiny_model_dir, data_dir, space, tmp_path / "s", "--trials", 1, *more)) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "s").exists()
    for text, message in (("targets: nosuch_proj\n", "targets: 'nosuch_proj'"), ("layers: 0-99\n", "layers: '0-99'")):
        bad = write_space(tmp_path, text, "bad.yaml")
        assert main(tune_args(tiny_model_dir, data_dir, bad, tmp_path / "s", "--trials", 1)) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "s").exists()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert main(tune_args(tiny_model_dir, data_dir, space, tmp_path / "dangling", "--trials", 1)) == 2
    assert "is a link to nothing" in capsys.readouterr().err
    assert main(tune_args(tiny_model_dir, data_dir, space, tmp_path / "s", "--trials", 1)) == 0


def test_best_keeps_the_users_files_and_its_card_reads_as_yaml(tiny_model_dir, data_dir, tmp_path, capsys):
    import yaml

    out = tmp_path / "my study"
    assert main(tune_args(tiny_model_dir, data_dir, write_space(tmp_path), out, "--trials", 1)) == 0
    card = (out / "best" / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["tags"][0] == "doratweet"
    assert f"--adapter '{out / 'best'}'" in card and f"--data {data_dir}" in card
    (out / "best" / "my_notes.txt").write_text("mine")
    assert main(tune_args(tiny_model_dir, data_dir, write_space(tmp_path), out, "--trials", 1, "--resume")) == 2
    assert "best/my_notes.txt is not something tune wrote" in capsys.readouterr().err
    assert (out / "best" / "my_notes.txt").read_text() == "mine"


def test_a_study_whose_every_trial_failed_exits_with_an_error(tiny_model_dir, data_dir, tmp_path, monkeypatch,
                                                              capsys):
    from doratweet import tune

    def fails(self, trial, values, folder):
        raise UserError("training stopped at step 3: the loss became nan")

    monkeypatch.setattr(tune.TrialRunner, "train_and_score", fails)
    out = tmp_path / "study"
    assert main(tune_args(tiny_model_dir, data_dir, write_space(tmp_path), out, "--trials", 2)) == 2
    assert "no trial finished: all 2 failed, the last with: training stopped" in capsys.readouterr().err
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["state"] for r in rows] == ["failed", "failed"] and "loss became nan" in rows[0]["error"]
