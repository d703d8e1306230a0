"""LoRA (Hu et al. 2021): y = W x + b + s * B A dropout(x)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..hardware import fp32_or_wider


def scaling_factor(rank: int, alpha: float, use_rslora: bool) -> float:
    # rsLoRA (Kalajdzievska 2023) keeps the update's scale stable across ranks with alpha / sqrt(r).
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def low_rank_pair(base: nn.Linear, rank: int) -> tuple[nn.Parameter, nn.Parameter]:
    """A like nn.Linear's default init (PEFT's default), B = 0 so the adapter starts as a no-op.

    Adapter weights are fp32 for any narrower base dtype: they are tiny and train better in full precision.
    """
    device, dtype = base.weight.device, torch.promote_types(base.weight.dtype, torch.float32)
    lora_A = torch.empty(rank, base.in_features, device=device, dtype=dtype)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    lora_B = torch.zeros(base.out_features, rank, device=device, dtype=dtype)
    return nn.Parameter(lora_A), nn.Parameter(lora_B)


class LowRankAdapter(nn.Module):
    """What LoRA and DoRA share: the frozen base linear, A and B, the scale s, and dropout."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = scaling_factor(rank, alpha, use_rslora)
        self.lora_A, self.lora_B = low_rank_pair(base, rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora(self, x: torch.Tensor) -> torch.Tensor:
        """B A x, computed in the activation dtype without forming B A."""
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))


class LoRALinear(LowRankAdapter):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora(self.dropout(x))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        weight = fp32_or_wider(self.base.weight) + self.scaling * (self.lora_B @ self.lora_A)
        return weight.to(self.base.weight.dtype)
