"""Which device and precision to use."""

from __future__ import annotations

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


def inference_model(model, device: torch.device, bf16: bool | None = None, copy: bool = True):
    """The model for evaluation: adapters merged into the weights (no adapter cost per token), in bf16 where
    that is fast. bf16 weights beat bf16 autocast, which re-casts every weight on every call. `copy=True`
    leaves `model` as it is (training goes on with it); `copy=False` converts it in place, saving a copy."""
    import copy as copying

    from .adapters import merge_adapters

    if bf16 is None:  # an fp64 model was asked for exactness over speed (the tests compare runs with one)
        bf16 = bf16_is_fast(device) and next(model.parameters()).dtype != torch.float64
    merged = merge_adapters(copying.deepcopy(model) if copy else model).eval()
    if not bf16:
        return merged
    head = Float32Head(merged.get_output_embeddings().weight)
    merged.to(torch.bfloat16)
    merged.config.tie_word_embeddings = False  # the embeddings go bf16, the head keeps its own fp32 copy
    merged.set_output_embeddings(head)
    return merged


class Float32Head(torch.nn.Module):
    """The output projection in fp32 for a bf16 model. Label scores are differences of log-probabilities over a
    49k-word vocabulary; with bf16 head weights they moved enough to change 2.6% of the labels and macro-F1 by
    0.009 (quick adapter, 1,000 test tweets), with this head 0.6% and 0.0002. It costs one fp32 copy of the
    head and fp32 matmuls at the few positions scored or generated."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().float().clone(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.float(), self.weight)
