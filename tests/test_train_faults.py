"""Training survives what happens to long runs: Ctrl-C, SIGKILL at any moment, damaged checkpoints, NaN losses.

The killed runs are real processes (`doratweet train`), killed by SIGKILL from inside at a chosen point; the
resumed run must end with exactly the adapter and the log an uninterrupted run writes.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TWEETS, build_tiny_model
from safetensors.torch import load_file

import doratweet.train as train_module
from doratweet.adapters import add_adapters
from doratweet.checkpoints import checkpoint_folders
from doratweet.cli import main
from doratweet.data import Split
from doratweet.errors import UserError
from doratweet.prompts import make_prompt_format
from doratweet.adapters import AdapterConfig
from doratweet.config import TrainConfig
from doratweet.train import train

OPTIONS = ["--max-steps", "8", "--save-every", "2", "--eval-every", "3", "--rank", "4", "--alpha", "8",
           "--batch-size", "4", "--dropout", "0.1", "--lr", "5e-3"]

# Runs `doratweet train` and SIGKILLs itself at the point named by argv[1:3]; the rest of argv goes to the CLI.
DYING_TRAINER = r"""
import os, signal, sys
import doratweet.checkpoints as checkpoints
import doratweet.train as train
from doratweet.cli import main

point, at = sys.argv[1], int(sys.argv[2])

def signal_on(n_calls, sig, real):
    calls = {"n": 0}
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in n_calls:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)
    return wrapper

if point == "mid-step":  # inside the forward pass of micro-batch `at`
    train.answer_loss = signal_on({at}, signal.SIGKILL, train.answer_loss)
elif point == "mid-checkpoint":  # checkpoint `at`: tensors written, state.json not yet
    real_fsync = checkpoints._fsync
    def fsync_then_die(path):
        real_fsync(path)
        if path.name == checkpoints.TENSORS_FILE and path.parent.name == f".step-{at:08d}.tmp":
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoints._fsync = fsync_then_die
elif point == "mid-cleanup":  # while removing an old checkpoint, after checkpoint `at` was written
    real_replace = os.replace
    def replace_then_die(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".trash") and any(p.name == f"step-{at:08d}" for p in checkpoints.checkpoint_folders(
                checkpoints.Path(dst).parent)):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoints.os.replace = replace_then_die
elif point == "ctrl-c":  # one Ctrl-C during micro-batch `at`
    train.answer_loss = signal_on({at}, signal.SIGINT, train.answer_loss)
elif point == "ctrl-c-twice":  # two Ctrl-C during micro-batch `at`
    train.answer_loss = signal_on({at}, signal.SIGINT, signal_on({at}, signal.SIGINT, train.answer_loss))
elif point == "sigterm":  # SIGTERM (kill, docker stop, a SLURM time limit) during micro-batch `at`
    train.answer_loss = signal_on({at}, signal.SIGTERM, train.answer_loss)
elif point == "sigterm-twice":
    train.answer_loss = signal_on({at}, signal.SIGTERM, signal_on({at}, signal.SIGTERM, train.answer_loss))
elif point == "sigterm-before-training":  # while `run` evaluates the base model, before training starts
    import doratweet.pipeline as pipeline
    pipeline.timed_predictions = signal_on({at}, signal.SIGTERM, pipeline.timed_predictions)
sys.exit(main(sys.argv[3:]))
"""


def train_args(model_dir, data_dir, out, *extra):
    return ["--quiet", "train", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out), *OPTIONS, *extra]


def run_dying(point, at, args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", DYING_TRAINER, point, str(at), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def adapter_of(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def log_without_timings(out):
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("tokens_per_s", "elapsed_s")} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(train_args(tiny_model_dir, tiny_data_dir, out)) == 0
    return out


def assert_same_run(out, reference):
    first, second = adapter_of(reference), adapter_of(out)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert log_without_timings(out) == log_without_timings(reference)


@pytest.mark.slow
@pytest.mark.parametrize("point, at, resumes_from", [
    ("mid-step", 7, 6),  # killed during step 7's forward pass
    ("mid-checkpoint", 4, 2),  # killed while writing checkpoint 4: that one is skipped
    ("mid-cleanup", 6, 6),  # killed while deleting checkpoint 2 after writing 6
])
def test_a_run_killed_at_any_moment_resumes_to_the_uninterrupted_result(
        point, at, resumes_from, uninterrupted, tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    died = run_dying(point, at, train_args(tiny_model_dir, tiny_data_dir, out))
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert checkpoint_folders(out / "checkpoint")[0].name == f"step-{resumes_from:08d}"
    assert main(train_args(tiny_model_dir, tiny_data_dir, out, "--resume")) == 0
    assert_same_run(out, uninterrupted)
    assert not list((out / "checkpoint").glob(".*")), "temporary and half-deleted folders are cleaned up"


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_exits_130(uninterrupted, tiny_model_dir, tiny_data_dir,
                                                                      tmp_path):
    out = tmp_path / "run"
    stopped = run_dying("ctrl-c", 5, train_args(tiny_model_dir, tiny_data_dir, out))
    assert stopped.returncode == 130
    assert "finishing this step" in stopped.stderr and "Traceback" not in stopped.stderr
    assert checkpoint_folders(out / "checkpoint")[0].name == "step-00000005"  # step 5 was finished, then saved
    assert main(train_args(tiny_model_dir, tiny_data_dir, out, "--resume")) == 0
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("how, status", [("ctrl-c-twice", 130), ("sigterm-twice", 128 + signal.SIGTERM)])
def test_a_second_ctrl_c_or_sigterm_stops_at_once_with_a_checkpoint_of_the_last_whole_step(
        how, status, uninterrupted, tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    stopped = run_dying(how, 5, train_args(tiny_model_dir, tiny_data_dir, out))
    assert stopped.returncode == status, stopped.stderr
    assert checkpoint_folders(out / "checkpoint")[0].name == "step-00000004"
    assert main(train_args(tiny_model_dir, tiny_data_dir, out, "--resume")) == 0
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_a_checkpoint_and_exits_143(uninterrupted, tiny_model_dir, tiny_data_dir,
                                                                     tmp_path):
    out = tmp_path / "run"
    stopped = run_dying("sigterm", 5, train_args(tiny_model_dir, tiny_data_dir, out))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "SIGTERM: finishing this step" in stopped.stderr and "Traceback" not in stopped.stderr
    kept = out / "checkpoint" / "step-00000005"
    assert stopped.stderr.splitlines()[-1] == (f"doratweet: stopped by SIGTERM; the last good checkpoint, {kept}, is "
                                               "kept (continue from it with --resume)")
    assert checkpoint_folders(out / "checkpoint")[0].name == "step-00000005"
    assert main(train_args(tiny_model_dir, tiny_data_dir, out, "--resume")) == 0
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
def test_sigterm_from_outside_like_timeout_or_docker_stop_leaves_a_checkpoint_to_resume(tiny_model_dir, tiny_data_dir,
                                                                                        tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, tiny_data_dir, out, "--log-every", "1", "--max-steps", "100000")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "doratweet", *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_log.jsonl").is_file() or not (out / "train_log.jsonl").read_text().count("\n") >= 2:
            assert process.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    saved = json.loads((checkpoint_folders(out / "checkpoint")[0] / "state.json").read_text())["progress"]["step"]
    assert saved == max(line["step"] for line in log_without_timings(out))  # the step it was in, finished
    assert "continue from it with --resume" in stderr.splitlines()[-1]


@pytest.mark.slow
def test_sigterm_before_training_starts_is_one_line_and_exits_143(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--quiet", "run", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--out", str(out),
            "--max-steps", "2", "--rank", "4", "--alpha", "8", "--batch-size", "4"]
    stopped = run_dying("sigterm-before-training", 1, args)
    assert stopped.returncode == 128 + signal.SIGTERM
    assert stopped.stderr.startswith("doratweet: stopped by SIGTERM") and stopped.stderr.count("\n") == 1
    assert not (out / "adapter").exists()


def test_training_restores_the_signal_handlers_it_replaced(tmp_path):
    def mine(signum, frame):
        pass

    previous = {sig: signal.signal(sig, mine) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        model, tokenizer = build_tiny_model()
        train(model, make_prompt_format(tokenizer), TRAIN, None, TrainConfig(AdapterConfig(rank=4, alpha=8, dropout=0.05), batch_size=4,
                                                                            max_steps=1), tmp_path, progress=False)
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_the_command_restores_the_sigterm_handler_it_replaced(tmp_path):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert main(["report", str(tmp_path / "nowhere")]) == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_with_a_message(uninterrupted, tiny_model_dir, tiny_data_dir,
                                                                tmp_path, caplog):
    out = tmp_path / "run"
    died = run_dying("mid-step", 7, train_args(tiny_model_dir, tiny_data_dir, out))
    assert died.returncode == -signal.SIGKILL
    newest = checkpoint_folders(out / "checkpoint")[0]
    tensors = newest / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-10] + b"0123456789")  # a flipped tail, e.g. a bad disk
    caplog.set_level("WARNING")
    assert main(train_args(tiny_model_dir, tiny_data_dir, out, "--resume")) == 0
    assert f"checkpoint {newest} is damaged" in caplog.text and "checksum" in caplog.text
    assert_same_run(out, uninterrupted)


def test_resume_without_a_checkpoint_is_one_clear_line(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, tiny_data_dir, tmp_path / "new", "--resume")) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and err.count("\n") == 1


@pytest.mark.slow
def test_resume_with_other_options_is_refused(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_dying("mid-step", 7, train_args(tiny_model_dir, tiny_data_dir, out)).returncode == -signal.SIGKILL
    assert main(train_args(tiny_model_dir, tiny_data_dir, out, "--resume", "--lr", "1e-3", "--train-precision",
                           "fp32", "--class-weighted")) == 2
    err = capsys.readouterr().err  # as the user gave them: flags and values, not the settings' internal names
    assert "options differ from the checkpoint's (--lr " in err and " then, 0.001 now; " in err
    assert "--train-precision auto then, fp32 now" in err and "--class-weighted not given then, given now" in err


def test_checkpoints_load_without_pickle(uninterrupted):
    # Plain files: safetensors (no code can run when it is read) and JSON.
    newest = checkpoint_folders(uninterrupted / "checkpoint")[0]
    assert sorted(p.name for p in newest.iterdir()) == ["state.json", "tensors.safetensors"]
    assert json.loads((newest / "state.json").read_text())["progress"]["step"] == 8
    assert len(checkpoint_folders(uninterrupted / "checkpoint")) == 2  # the newest two are kept


TRAIN = Split("train", [t for t, _ in TWEETS], [y for _, y in TWEETS], "test")


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = train_module.answer_loss, []

    def nan_at_fifth_batch(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(train_module, "answer_loss", nan_at_fifth_batch)
    model, tokenizer = build_tiny_model()
    config = TrainConfig(AdapterConfig(rank=4, alpha=8, dropout=0.05), batch_size=4, max_steps=8, save_every=2)
    with pytest.raises(UserError, match=r"step 5: the loss became nan .*step-00000004.* is kept"):
        train(model, make_prompt_format(tokenizer), TRAIN, None, config, tmp_path, progress=False)
    newest = checkpoint_folders(tmp_path / "checkpoint")
    assert [p.name for p in newest] == ["step-00000004", "step-00000002"]
    saved = load_file(newest[0] / "tensors.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_an_infinite_gradient_stops_training_before_the_update(tmp_path):
    model, tokenizer = build_tiny_model()
    add_adapters(model, method="dora", rank=4, alpha=8)
    magnitude = next(p for n, p in model.named_parameters() if n.endswith("magnitude"))
    before = magnitude.detach().clone()
    magnitude.register_hook(lambda grad: torch.full_like(grad, math.inf))
    config = TrainConfig(AdapterConfig(rank=4, alpha=8, dropout=0.05), batch_size=4, max_steps=3)
    with pytest.raises(UserError, match=r"step 1: the gradient norm became (inf|nan).*no checkpoint had been saved"):
        train(model, make_prompt_format(tokenizer), TRAIN, None, config, tmp_path, progress=False)
    assert torch.equal(magnitude.detach(), before)
