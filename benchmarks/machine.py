"""What a benchmark ran on, recorded in every result: the two kinds of CPU these figures come from (Intel Xeon
with AMX, AMD EPYC with AVX-512 BF16/VNNI and no AMX) differ by up to 2x in speed and in the last bits."""

from __future__ import annotations

import os
import platform
import subprocess

# The flags that decide which bf16/int8 kernels a CPU gets.
KERNEL_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx2")


def cpu_model() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    for line in lscpu.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def machine() -> dict:
    """CPU model, its kernel flags, cores and torch's threads (and the GPU, when there is one)."""
    import torch

    facts = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def describe(facts: dict) -> str:
    """One line for a table's heading."""
    where = facts.get("gpu") or f"{facts['cpu']} ({', '.join(facts['cpu_flags']) or 'no AMX/AVX-512'})"
    return f"{where}, {facts['torch_threads']} torch threads, torch {facts['torch']}"


def save_report(path, report: dict) -> None:
    """Write a benchmark's JSON result, making its folder."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
