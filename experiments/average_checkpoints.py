"""Checkpoint averaging (issue 5): the mean of the adapter weights of several training checkpoints of one run
(or of several adapter folders along one line of training), written as an adapter folder that
`doratweet evaluate --adapter` reads.

    python experiments/average_checkpoints.py --like runs/cont25k/adapter --out runs/cont25k-avg \
        CKPT/step-00001200 CKPT/step-00001400 CKPT/step-00001600
    python experiments/average_checkpoints.py --like runs/best/adapter --out runs/rounds-avg \
        runs/best/round-1/adapter runs/best/adapter

A, B and the DoRA magnitude are averaged one by one (not B@A): the checkpoints come from the end of one run, at a
small learning rate, where they sit close together. The adapter's config is copied from `--like` (an adapter of
the same run), so the shape, base model and prompt are that run's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_PREFIX = "adapter."  # how train.py names the adapter's tensors inside a checkpoint


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter weights in a checkpoint folder or in an adapter folder (PEFT's file)."""
    if (folder / "adapter_model.safetensors").is_file():
        return load_file(folder / "adapter_model.safetensors")
    tensors = load_file(folder / "tensors.safetensors")
    return {k[len(ADAPTER_PREFIX):]: v for k, v in tensors.items() if k.startswith(ADAPTER_PREFIX)}


def mean_adapter(checkpoints: list[Path]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for checkpoint in checkpoints:
        adapter = {k: v.double() for k, v in adapter_tensors(checkpoint).items()}
        if total and adapter.keys() != total.keys():
            sys.exit(f"{checkpoint}: its adapter tensors differ from the first one's (average checkpoints, or "
                     "adapter folders, of one model)")
        for key, value in adapter.items():
            total[key] = total[key] + value if key in total else value
    return {k: (v / len(checkpoints)).float().contiguous() for k, v in total.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders (step-NNNNNNNN) or adapter folders")
    parser.add_argument("--like", type=Path, required=True, help="an adapter folder of the same run (its config)")
    parser.add_argument("--out", type=Path, required=True, help="adapter folder to write (must not exist)")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"--out {args.out}: exists; choose a new folder")
    weights = mean_adapter(args.checkpoints)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(args.like / "adapter_config.json", tmp / "adapter_config.json")
    save_file(weights, tmp / "adapter_model.safetensors")
    tmp.rename(args.out)
    print(f"{args.out}: the mean of {len(args.checkpoints)} checkpoints ({len(weights)} tensors)")


if __name__ == "__main__":
    main()
