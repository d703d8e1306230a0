"""Training under torchrun: N processes with the same global batch follow the one-process trajectory, and
resume after an interruption.

Every launch here is real: `python -m torch.distributed.run --standalone --nproc_per_node 2` (a free port is
picked by the launcher) starting `doratweet train` on the tiny model, on CPU with the gloo backend. Dropout is
0 so that the runs can be compared number for number. Tolerances: the logged losses agree to 1e-5 relative;
adapter weights to 1e-6 absolute + 1e-4 relative (all-reduce adds in another order than one process does,
and AdamW's first steps divide by the gradient's own size, which lifts rounding in near-zero gradients to
~2e-7 on weights of ~1e-2). A resumed run and its uninterrupted twin, both with 2 processes, agree exactly.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny_model
from safetensors.torch import load_file

from doratweet.adapters import adapter_state_dict, load_adapter
from doratweet.checkpoints import checkpoint_folders
from doratweet.cli import main

# 11 tweets in micro-batches of 5: shares of 3+2 tweets, and a last batch of 1 that leaves rank 1 with nothing
# (it then runs with weight 0); 3 micro-batches per step exercise DDP's no_sync accumulation.
OPTIONS = ["--train-limit", "11", "--batch-size", "5", "--grad-accum", "3", "--max-steps", "6", "--rank", "4",
           "--alpha", "8", "--dropout", "0", "--lr", "2e-2", "--save-every", "2", "--log-every", "1"]

# `doratweet train` where rank 1 alone gets a Ctrl-C (SIGINT) during its micro-batch number argv[1].
INTERRUPTED_ON_RANK_1 = r"""
import os, signal, sys
import doratweet.train as train
from doratweet.cli import main

at = int(sys.argv[1])
if os.environ["RANK"] == "1":
    real, calls = train.answer_loss, []
    def answer_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGINT)
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
    assert len(losses) == 6 and all(a == pytest.approx(b, rel=1e-5) for a, b in losses)


def assert_close_adapters(out, reference):
    ours, theirs = adapter_of(out), adapter_of(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-6), key


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    # One thread, as each rank has (OMP_NUM_THREADS=1 in `torchrun`): with the same summation order inside each
    # op, what is left to differ is the averaging of gradients across ranks. With this pytest's threads instead,
    # a float-level difference once grew, through AdamW, to 1.7e-4 in the last step's loss.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(train_args(tiny_model_dir, tiny_data_dir, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def two_processes(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    launched = torchrun(2, train_args(tiny_model_dir, tiny_data_dir, out))
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
    launched = torchrun(1, train_args(tiny_model_dir, tiny_data_dir, out))
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert_same_trajectory(out, one_process)
    assert_close_adapters(out, one_process)


def test_ctrl_c_on_one_rank_stops_all_after_the_same_step_and_resume_ends_as_the_uninterrupted_run(
        tiny_model_dir, tiny_data_dir, two_processes, tmp_path):
    out, script = tmp_path / "run", tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_ON_RANK_1)
    stopped = torchrun(2, ["11", *train_args(tiny_model_dir, tiny_data_dir, out)], script)  # during step 4
    assert stopped.returncode != 0 and "finishing this step" in stopped.stderr
    assert checkpoint_folders(out / "checkpoint")[0].name == "step-00000004"
    assert [line["step"] for line in log_of(out) if "loss" in line] == [1, 2, 3, 4]
    resumed = torchrun(2, train_args(tiny_model_dir, tiny_data_dir, out, "--resume"))
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
    out, script = tmp_path / "run", tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_ON_RANK_1)
    stopped = torchrun(2, ["8", *train_args(tiny_model_dir, tiny_data_dir, out, "--fsdp")], script)  # step 3
    assert stopped.returncode != 0 and checkpoint_folders(out / "checkpoint")[0].name == "step-00000003"
    resumed = torchrun(2, train_args(tiny_model_dir, tiny_data_dir, out, "--fsdp", "--resume"))
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
