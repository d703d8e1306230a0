"""Training under torchrun: N processes with the same global batch follow the one-process trajectory, and
resume after an interruption.

Every launch here is real: `python -m torch.distributed.run --standalone --nproc_per_node 2` (a free port is
picked by the launcher) starting `doratweet train` on the tiny model, on CPU with the gloo backend. Dropout is
0 so that the runs can be compared number for number.

The runs being compared add the same numbers in other orders (the all-reduce, each rank's batch shapes, the
shared prefix's gradient summed over other tweets, one thread per rank against pytest's), so they run in float64
throughout (`helpers.models_in_float64`): that rounding is then ~1e-16 relative on any CPU. AdamW is where it
could grow: a step moves a weight by lr * g / (|g| + eps), so a gradient that differs by d moves a weight by at
most lr * d / eps; with d <= 1e-15 that is 2e-2 * 1e-15 / 1e-8 = 2e-9 a step, 1.2e-8 over the 6 steps (1.3e-15
measured). In float32, d ~ 1e-8 and the same bound is ~lr itself: why a float32 comparison failed on another
CPU. Tolerances: weights to 1e-7 absolute, losses to 1e-9 relative (5e-16 measured); validation figures, steps
and learning rates exactly. Ranks on wrong slices, a mis-weighted loss or a skipped all-reduce move weights by
~lr = 2e-2 and losses by more than 1e-3. A resumed run and its uninterrupted twin, both with 2 processes,
agree exactly.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import build_tiny_model
from helpers import models_in_float64
from safetensors.torch import load_file

from doratweet.adapters import adapter_state_dict, load_adapter
from doratweet.checkpoints import checkpoint_folders
from doratweet.cli import main

pytestmark = pytest.mark.distributed

# 11 tweets in micro-batches of 5: shares of 3+2 tweets, and a last batch of 1 that leaves rank 1 with nothing
# (it then runs with weight 0); 3 micro-batches per step exercise DDP's no_sync accumulation.
OPTIONS = ["--train-limit", "11", "--batch-size", "5", "--grad-accum", "3", "--max-steps", "6", "--rank", "4",
           "--alpha", "8", "--dropout", "0", "--lr", "2e-2", "--save-every", "2", "--log-every", "1"]

# `doratweet train` on the model in float64; with argv[1] > 0, rank 1 alone gets a Ctrl-C (SIGINT) during its
# micro-batch number argv[1].
RANK_SCRIPT = r"""
import os, signal, sys
import doratweet.train as train
from doratweet.cli import main
from helpers import models_in_float64

at = int(sys.argv[1])
if at and os.environ["RANK"] == "1":
    real, calls = train.answer_loss, []
    def answer_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    train.answer_loss = answer_loss
with models_in_float64():
    sys.exit(main(sys.argv[2:]))
"""


def train_args(model_dir, data_dir, out, *extra):
    return ["--quiet", "train", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out), *OPTIONS,
            *extra]


def torchrun(processes, args, tmp_path, interrupt_at=0):
    """Launch `doratweet train ARGS` in float64 in `processes` processes (rank 1 gets a Ctrl-C during its
    micro-batch number `interrupt_at` when that is not 0); the launcher's result."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(script), str(interrupt_at), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


def adapter_of(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def log_of(out):
    """The train log without its timings."""
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("tokens_per_s", "elapsed_s")} for line in lines]


def assert_same_trajectory(out, reference):
    ours, theirs = log_of(out), log_of(reference)
    assert [{k: v for k, v in line.items() if k != "loss"} for line in ours] == \
        [{k: v for k, v in line.items() if k != "loss"} for line in theirs]  # steps, epochs, lr, validation
    losses = [(a["loss"], b["loss"]) for a, b in zip(ours, theirs) if "loss" in a]
    assert len(losses) == 6 and all(a == pytest.approx(b, rel=1e-9) for a, b in losses)


def assert_close_adapters(out, reference):
    ours, theirs = adapter_of(out), adapter_of(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == torch.float64 and torch.allclose(ours[key], theirs[key], rtol=0, atol=1e-7), key


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    with models_in_float64():  # this process's threads, unlike the ranks' one each: float64 makes that moot
        assert main(train_args(tiny_model_dir, tiny_data_dir, out)) == 0
    return out


@pytest.fixture(scope="module")
def two_processes(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    launched = torchrun(2, train_args(tiny_model_dir, tiny_data_dir, out), out.parent)
    assert launched.returncode == 0, launched.stderr[-3000:]
    return out


def test_two_processes_follow_the_one_process_losses_and_end_with_the_same_adapter(two_processes, one_process):
    assert_same_trajectory(two_processes, one_process)
    assert_close_adapters(two_processes, one_process)
    summary = json.loads((two_processes / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["parallelism"] == "ddp"


def test_only_rank_0_writes_and_its_checkpoint_records_the_world_size(two_processes):
    assert sorted(p.name for p in two_processes.iterdir()) == ["adapter", "checkpoint", "train_log.jsonl",
                                                               "train_summary.json"]
    newest = checkpoint_folders(two_processes / "checkpoint")[0]
    assert json.loads((newest / "state.json").read_text())["world_size"] == 2
    rng = [k for k in load_file(newest / "tensors.safetensors") if k.startswith("rng.")]
    assert sorted(rng) == ["rng.torch.rank0", "rng.torch.rank1"]  # each rank's dropout stream


def test_one_process_under_torchrun_is_the_plain_run(tiny_model_dir, tiny_data_dir, one_process, tmp_path):
    # DDP with a world of 1: the CPU stand-in for "a single-GPU DDP run matches the plain run".
    out = tmp_path / "run"
    launched = torchrun(1, train_args(tiny_model_dir, tiny_data_dir, out), tmp_path)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert_same_trajectory(out, one_process)
    assert_close_adapters(out, one_process)


def test_ctrl_c_on_one_rank_stops_all_after_the_same_step_and_resume_ends_as_the_uninterrupted_run(
        tiny_model_dir, tiny_data_dir, two_processes, tmp_path):
    out = tmp_path / "run"
    stopped = torchrun(2, train_args(tiny_model_dir, tiny_data_dir, out), tmp_path, interrupt_at=11)  # step 4
    assert stopped.returncode != 0 and "finishing this step" in stopped.stderr
    assert checkpoint_folders(out / "checkpoint")[0].name == "step-00000004"
    assert [line["step"] for line in log_of(out) if "loss" in line] == [1, 2, 3, 4]
    resumed = torchrun(2, train_args(tiny_model_dir, tiny_data_dir, out, "--resume"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert log_of(out) == log_of(two_processes)
    first, second = adapter_of(out), adapter_of(two_processes)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_with_another_number_of_processes_is_one_line(tiny_model_dir, tiny_data_dir, two_processes, capsys):
    assert main(train_args(tiny_model_dir, tiny_data_dir, two_processes, "--resume")) == 2
    err = capsys.readouterr().err
    assert "written by 2 process(es) and this run has 1" in err and err.count("\n") == 1


def test_fsdp_trains_resumes_and_ends_with_the_one_process_adapter(tiny_model_dir, tiny_data_dir, one_process,
                                                                   tmp_path):
    out = tmp_path / "run"
    stopped = torchrun(2, train_args(tiny_model_dir, tiny_data_dir, out, "--fsdp"), tmp_path, interrupt_at=8)  # step 3
    assert stopped.returncode != 0 and checkpoint_folders(out / "checkpoint")[0].name == "step-00000003"
    resumed = torchrun(2, train_args(tiny_model_dir, tiny_data_dir, out, "--fsdp", "--resume"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_trajectory(out, one_process)
    assert_close_adapters(out, one_process)  # gathered whole on rank 0, in PEFT's format
    assert json.loads((out / "train_summary.json").read_text())["parallelism"] == "fsdp"
    model, _ = build_tiny_model()
    load_adapter(model, out / "adapter")  # its config and base-model fingerprint are those of a whole model
    assert adapter_state_dict(model).keys() == adapter_of(one_process).keys()


def test_fsdp_without_a_launcher_is_one_line(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", "--fsdp")) == 2
    err = capsys.readouterr().err
    assert "--fsdp: shards the model across several processes" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
