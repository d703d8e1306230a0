"""SIGTERM under torchrun: `kill`, `docker stop` and SLURM signal the launcher, which passes SIGTERM on to every
rank (and waits --shutdown_timeout, 30 s by default, before SIGKILL). Every rank finishes the same step, rank 0
saves one checkpoint, and `--resume` ends exactly as an uninterrupted run with the same processes.

Real launches, as in test_distributed.py: `python -m torch.distributed.run --standalone --nproc_per_node 2` on the
tiny model, on CPU with gloo, dropout 0.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from doratweet.checkpoints import checkpoint_folders

pytestmark = pytest.mark.distributed

# 11 tweets in micro-batches of 5, 3 per step: micro-batch 11 falls in step 4.
OPTIONS = ["--train-limit", "11", "--batch-size", "5", "--grad-accum", "3", "--max-steps", "6", "--rank", "4",
           "--alpha", "8", "--dropout", "0", "--lr", "2e-2", "--save-every", "2", "--log-every", "1"]

# `doratweet train` where rank 1, in its micro-batch number argv[1], sends SIGTERM to the launcher (its parent) as
# `kill` would, then waits until the launcher has passed it on, so that the step the ranks stop after is known.
LAUNCHER_TERMINATED_BY_RANK_1 = r"""
import os, signal, sys, time
import doratweet.train as train
from doratweet.cli import main

at = int(sys.argv[1])
if os.environ["RANK"] == "1":
    real, calls = train.answer_loss, []
    def answer_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getppid(), signal.SIGTERM)
            requests = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)  # training's StopRequests
            deadline = time.monotonic() + 60
            while not getattr(requests, "pressed", False) and time.monotonic() < deadline:
                time.sleep(0.01)
        return real(*args, **kwargs)
    train.answer_loss = answer_loss
sys.exit(main(sys.argv[2:]))
"""


def train_args(model_dir, data_dir, out, *extra):
    return ["--quiet", "train", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out), *OPTIONS,
            *extra]


def torchrun(processes, args, script=None):
    """Launch `doratweet train ARGS` (or `script ARGS`) in `processes` processes; the launcher's result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    target = [str(script)] if script else ["-m", "doratweet.cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *target, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


def log_of(out):
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("tokens_per_s", "elapsed_s")} for line in lines]


def test_sigterm_to_the_launcher_stops_every_rank_after_the_same_step_and_resume_ends_as_the_uninterrupted_run(
        tiny_model_dir, tiny_data_dir, tmp_path):
    reference = tmp_path / "uninterrupted"
    assert torchrun(2, train_args(tiny_model_dir, tiny_data_dir, reference)).returncode == 0
    out, script = tmp_path / "run", tmp_path / "terminated.py"
    script.write_text(LAUNCHER_TERMINATED_BY_RANK_1)
    stopped = torchrun(2, ["11", *train_args(tiny_model_dir, tiny_data_dir, out)], script)
    assert stopped.returncode != 0
    assert stopped.stderr.count("SIGTERM: finishing this step") == 2, stopped.stderr[-3000:]  # both ranks
    assert checkpoint_folders(out / "checkpoint")[0].name == "step-00000004"
    assert [line["step"] for line in log_of(out) if "loss" in line] == [1, 2, 3, 4]
    resumed = torchrun(2, train_args(tiny_model_dir, tiny_data_dir, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert log_of(out) == log_of(reference)
    first = load_file(out / "adapter" / "adapter_model.safetensors")
    second = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
