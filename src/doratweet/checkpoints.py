"""Resumable training checkpoints that survive being killed at any moment, in plain safetensors + JSON.

A checkpoint is a folder `checkpoint/step-00000012/` with two plain files:
- `tensors.safetensors`: adapter weights, AdamW moments and the RNG states;
- `state.json`: progress, options, the optimizer's and schedule's scalars, and the SHA-256 of the tensors file.

The folder is written under a temporary name and renamed into place, and `state.json` is written last, so a
checkpoint either exists whole or is recognised as incomplete (missing, unreadable, or a checksum that does not
match) and skipped in favour of the previous one. The two newest checkpoints are kept for that reason.
Nothing here unpickles: a checkpoint someone sends you cannot run code when it is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

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
    record = {"format": _FORMAT, "step": step, "sha256": {TENSORS_FILE: _sha256(tmp / TENSORS_FILE)}, **state}
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
    if _sha256(tensors_file) != state["sha256"][TENSORS_FILE]:
        raise _Damaged(f"{TENSORS_FILE} does not match its checksum")
    return load_file(tensors_file), state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
