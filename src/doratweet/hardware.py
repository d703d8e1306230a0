"""Which device and precision to use."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays on CUDA and on CPUs with native bf16 matmuls (AMX or AVX512-BF16); elsewhere fp32 is faster."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                    or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False


def inference_model(model, device: torch.device, bf16: bool | None = None, copy: bool = True):
    """The model for evaluation: adapters merged into the weights (no adapter cost per token), in bf16 where
    that is fast. bf16 weights beat bf16 autocast, which re-casts every weight on every call. `copy=True`
    leaves `model` as it is (training goes on with it); `copy=False` converts it in place, saving a copy."""
    import copy as copying

    from .adapters import merge_adapters

    bf16 = bf16_is_fast(device) if bf16 is None else bf16
    merged = merge_adapters(copying.deepcopy(model) if copy else model).eval()
    return merged.to(torch.bfloat16) if bf16 else merged
