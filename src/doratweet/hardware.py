"""Which device and precision to use: the device, whether bf16 is fast here, and fp32-or-wider arithmetic."""

from __future__ import annotations

import os
import platform
from datetime import date

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fp32_or_wider(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in fp32, or as it is when it is wider (fp64).

    Norms, losses and adapter weights are kept in fp32 even for bf16 models; an fp64 model stays fp64 all the
    way, which is what lets the tests compare two computations that sum in different orders to ~1e-15.
    """
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays on CUDA and on CPUs with native bf16 matmuls (AMX or AVX512-BF16); elsewhere fp32 is faster."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                    or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False


def bf16_training_pays(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether training in bf16 (train.HalfWeights on a CPU, autocast on CUDA) is faster than fp32 here, as measured
    (docs/performance.md, "Training precision"): where bf16 matmuls are native. An fp64 model was asked for
    exactness: never."""
    return dtype != torch.float64 and bf16_is_fast(device)


def environment(device: torch.device) -> dict:
    """The machine and versions a run used, for metrics.json."""
    import transformers

    from . import __version__

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{os.cpu_count()}-core {platform.processor() or platform.machine()} CPU")
    return {"device": device.type, "machine": machine, "torch": torch.__version__,
            "transformers": transformers.__version__, "doratweet": __version__, "date": date.today().isoformat()}
