"""Resumable training checkpoints that survive being killed at any moment, in plain safetensors + JSON, and what
training does with them: save one, resume from the newest, save one on Ctrl-C or SIGTERM.

A checkpoint is a folder `checkpoint/step-00000012/` with two plain files:
- `tensors.safetensors`: adapter weights, AdamW moments and the RNG states;
- `state.json`: progress, options, the optimizer's and schedule's scalars, and the SHA-256 of the tensors file.

The folder is written under a temporary name and renamed into place, and `state.json` is written last, so a
checkpoint either exists whole or is recognised as incomplete (missing, unreadable, or a checksum that does not
match) and skipped in favour of the previous one. The two newest checkpoints are kept for that reason.
Nothing here unpickles: a checkpoint someone sends you cannot run code when it is read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from . import distributed
from .adapters import adapter_state_dict, copy_adapter_tensors
from .errors import UserError
from .files import sha256_of

log = logging.getLogger("doratweet")

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
KEEP = 2  # the newest checkpoint, and the one before it in case the newest is damaged
_FORMAT = 1


def save_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write checkpoint `step` under `folder` atomically and drop all but the newest KEEP checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    for leftover in folder.glob(".step-*"):  # from a run killed while writing or deleting a checkpoint
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / TENSORS_FILE)
    _fsync(tmp / TENSORS_FILE)
    record = {"format": _FORMAT, "step": step, "sha256": {TENSORS_FILE: sha256_of(tmp / TENSORS_FILE)}, **state}
    (tmp / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    _fsync(tmp / STATE_FILE)
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a scheduled save)
        _remove(final)
    os.replace(tmp, final)
    for old in checkpoint_folders(folder)[KEEP:]:
        _remove(old)
    return final


def load_latest_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and state of the newest intact checkpoint; damaged ones are reported and skipped."""
    candidates = checkpoint_folders(folder)
    if not candidates:
        raise UserError(f"--resume: no checkpoint in {folder}; train without --resume, or point --out at the run "
                        "(checkpoints are written every --save-every steps and on Ctrl-C)")
    for candidate in candidates:
        try:
            return _read(candidate)
        except _Damaged as why:
            log.warning("checkpoint %s is damaged (%s); trying the one before it", candidate, why)
    raise UserError(f"--resume: every checkpoint in {folder} is damaged; start again without --resume "
                    "(pass --overwrite)")


def checkpoint_folders(folder: Path) -> list[Path]:
    """Finished checkpoint folders, newest first (temporary `.step-*.tmp` folders are not among them)."""
    if not folder.is_dir():
        return []
    return sorted(folder.glob("step-[0-9]*"), reverse=True)


class _Damaged(Exception):
    pass


def _read(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except FileNotFoundError:
        raise _Damaged(f"no {STATE_FILE}: it was interrupted while being written") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _Damaged(f"{STATE_FILE} is not valid JSON: {err}") from None
    if state.get("format") != _FORMAT:
        raise _Damaged(f"unknown checkpoint format {state.get('format')!r}")
    tensors_file = checkpoint / TENSORS_FILE
    if not tensors_file.is_file():
        raise _Damaged(f"no {TENSORS_FILE}")
    if sha256_of(tensors_file) != state["sha256"][TENSORS_FILE]:
        raise _Damaged(f"{TENSORS_FILE} does not match its checksum")
    return load_file(tensors_file), state




def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(checkpoint: Path) -> None:
    # Rename first: a kill half-way through deleting leaves a `.trash` folder that is never read as a checkpoint.
    trash = checkpoint.with_name(f".{checkpoint.name}.trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state dict into tensors (for safetensors) and plain values (for JSON)."""
    saved = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in saved["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": saved["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    """The inverse of `optimizer_to_files`: a state dict for `optimizer.load_state_dict`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in plain["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in plain["param_groups"]]
    return {"state": state, "param_groups": groups}


# --- training's checkpoints ---------------------------------------------------------------------------------------

# Options a resumed run may change: how often it logs, validates or saves, and --fsdp (checkpoints hold whole tensors
# either way).
_MAY_CHANGE_ON_RESUME = ("eval_every", "save_every", "log_every", "fsdp")


def resume_relevant(settings: dict) -> dict:
    """The training settings (`TrainConfig.flat()` with the run's notes as `extra`) a resumed run must share with
    the checkpoint, as JSON sees them (tuples become lists)."""
    values = {k: v for k, v in settings.items() if k not in _MAY_CHANGE_ON_RESUME}
    return _comparable(json.loads(json.dumps(values)))


def _comparable(options: dict) -> dict:
    """Options as a resume compares them. Neither the order of the targets nor where an adapter trained further
    came from changes what the checkpoint continues (it holds the adapter's weights)."""
    options = dict(options)
    if "targets" in options and isinstance(options["targets"], list):
        options["targets"] = sorted(options["targets"])
    if "extra" in options:
        options["extra"] = {k: v for k, v in (options["extra"] or {}).items() if k != "init_adapter"}
    return options


def _flag(name: str) -> str:
    """A setting as the command line spells it (`bf16` is --train-precision, `cache_frozen` --no-cache-frozen)."""
    from dataclasses import fields

    from .config import AdapterConfig, TrainConfig

    for f in (*fields(AdapterConfig), *fields(TrainConfig)):
        if f.name == name and "help" in f.metadata:
            flag = f.metadata.get("flag", "--" + name.replace("_", "-"))
            return "--no-" + flag[2:] if f.default is True else flag
    return name  # the run's notes (extra): the system prompt, the base model


def _difference(name: str, then, now) -> str:
    """One setting a resume would change, as the user gave it: `--lr 0.0005 then, 0.001 now`."""
    if name == "extra":  # the run's notes: name what differs, not the whole record
        keys = sorted(k for k in {*(then or {}), *(now or {})} if (then or {}).get(k) != (now or {}).get(k))
        return "the run's " + ", ".join(k.replace("_", " ") for k in keys)
    flag = _flag(name)
    if isinstance(then, bool) and isinstance(now, bool):
        given = then != flag.startswith("--no-")
        return f"{flag} {'given' if given else 'not given'} then, {'not given' if given else 'given'} now"
    return f"{flag} {_shown(name, then)} then, {_shown(name, now)} now"


def _shown(name: str, value) -> str:
    if name == "bf16":
        return {None: "auto", True: "bf16", False: "fp32"}.get(value, str(value))
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def save_training_checkpoint(folder: Path, model, optimizer, scheduler, progress: dict, settings: dict,
                             log_bytes: int) -> None:
    """Everything needed to continue exactly: adapter weights, optimizer, schedule, RNG, progress, log length.

    Several ranks: every rank calls this (FSDP's shards are gathered whole, each rank's RNG state is collected)
    and rank 0 writes one checkpoint. Adapter and optimizer are the same on every rank under DDP."""
    with distributed.whole_adapter(model):
        adapter = {f"adapter.{k}": v for k, v in adapter_state_dict(model).items()}
    optimizer_tensors, optimizer_plain = optimizer_to_files(optimizer)
    optimizer_tensors = {k: distributed.full_tensor(v) for k, v in optimizer_tensors.items()}
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    if distributed.active():  # every rank draws its own dropout masks
        every_rank = distributed.gather_from_all(rng)
        rng = {f"{k}.rank{r}": v for r, states in enumerate(every_rank) for k, v in states.items()}
    if distributed.is_main_process():
        save_checkpoint(folder, progress["step"], {**adapter, **optimizer_tensors, **rng}, {
            "progress": progress, "config": resume_relevant(settings), "optimizer": optimizer_plain,
            "scheduler": scheduler.state_dict(), "log_bytes": log_bytes, "world_size": distributed.world_size()})
    distributed.barrier()  # no rank leaves (e.g. exits after Ctrl-C, ending the job) before the checkpoint exists


def load_training_checkpoint(folder: Path, model, optimizer, scheduler, settings: dict) -> tuple[dict, int]:
    """Put the newest intact checkpoint's weights, optimizer, schedule and RNG states in place; returns its
    progress and the length of the training log when it was saved."""
    # Rank 0 reads (only its disk is sure to hold the run folder) and hands the checkpoint to the others.
    tensors, saved = distributed.broadcast_from_main(
        load_latest_checkpoint(folder) if distributed.is_main_process() else None)
    written_by, world = saved.get("world_size", 1), distributed.world_size()
    if written_by != world:  # each rank's RNG state is in the checkpoint, and exactness needs the same ranks
        raise UserError(f"--resume: the checkpoint in {folder} was written by {written_by} process(es) and this run "
                        f"has {world}; resume with {written_by} (e.g. torchrun --nproc_per_node {written_by})")
    current = resume_relevant(settings)
    written = _comparable(saved["config"])
    changed = [k for k in current if k in written and written[k] != current[k]]
    if changed:
        shown = "; ".join(_difference(k, written[k], current[k]) for k in changed)
        raise UserError(f"--resume: options differ from the checkpoint's ({shown}); use the same options")
    with distributed.whole_adapter(model):
        adapter = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
        copy_adapter_tensors(model, adapter, folder)
    optimizer_state = optimizer_from_files(tensors, saved["optimizer"])
    params = optimizer.param_groups[0]["params"]
    for index, per_param in optimizer_state["state"].items():  # whole moments -> this rank's shards (FSDP)
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.shape == params[index].shape:
                per_param[name] = distributed.shard_like(value, params[index])
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(saved["scheduler"])
    rng = tensors
    if distributed.active():  # this rank's own RNG states
        suffix = f".rank{distributed.rank()}"
        rng = {k.removesuffix(suffix): v for k, v in tensors.items() if k.endswith(suffix)}
    torch.set_rng_state(rng["rng.torch"])
    if "rng.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["rng.cuda"])
    return saved["progress"], saved["log_bytes"]


def last_checkpoint_note(folder: Path) -> str:
    """What a stopped run kept, for the last line the user sees."""
    found = checkpoint_folders(folder)
    if not found:
        return "no checkpoint had been saved (see --save-every)"
    return f"the last good checkpoint, {found[0]}, is kept (continue from it with --resume)"


@contextmanager
def checkpoint_on_interrupt(folder: Path, save: Callable[[], None], safe_to_save: Callable[[], bool]):
    """On Ctrl-C, or SIGTERM (stopping.Terminated), inside the block: save a checkpoint when `safe_to_save()`
    (between two optimizer steps, and with several ranks only when they stopped together, since saving is
    collective), then raise the same kind of interrupt with a note of what is kept."""
    try:
        yield
    except KeyboardInterrupt as stop:
        if safe_to_save():
            save()
        # The CLI's last line says what is kept; rank 0 alone is sure to see the run folder.
        raise type(stop)(last_checkpoint_note(folder) if distributed.is_main_process() else "") from stop
