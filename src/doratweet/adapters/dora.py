"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation").

    W' = m * (W + s B A) / ||W + s B A||       (norm of each output row)
    y  = W' x + b

m starts as the row norms of W and B as zero, so W' = W at step 0. Following section 4.3 of the paper the
norm is treated as a constant in backward (detached); it is computed in fp32 like PEFT does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import low_rank_pair, scaling_factor

# A row of W that is all zeros has m = 0 and norm 0; the floor turns 0/0 into 0 instead of NaN.
_NORM_FLOOR = 1e-12


class DoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = scaling_factor(rank, alpha, use_rslora)
        self.lora_A, self.lora_B = low_rank_pair(base, rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight_sq = base.weight.detach().float().pow(2).sum(dim=1)
        # ||W||^2 per row never changes (W is frozen): keep it, non-persistent, for the factored norm below.
        self.register_buffer("weight_sq_norm", weight_sq, persistent=False)
        self.magnitude = nn.Parameter(weight_sq.sqrt())
        self._norm: torch.Tensor | None = None
        self._norm_key: tuple | None = None

    def lora(self, x: torch.Tensor) -> torch.Tensor:
        """B A x, computed in the activation dtype without forming B A."""
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, fp32, detached; recomputed only after A, B or W change.

        Tensor version counters move on every in-place update (optimizer steps, load_state_dict), so the
        cached norm is reused across gradient accumulation, activation recomputation and evaluation.
        """
        key = tuple((p._version, p.data_ptr()) for p in (self.lora_A, self.lora_B, self.base.weight))
        if key != self._norm_key:
            if self._norm_key is None or key[2] != self._norm_key[2]:  # W itself changed (loaded, moved)
                self.weight_sq_norm = self.base.weight.detach().float().pow(2).sum(dim=1)
            self._norm = self._compute_weight_norm()
            self._norm_key = key
        return self._norm

    @torch.no_grad()
    def _compute_weight_norm(self) -> torch.Tensor:
        # ||W_j + s (BA)_j||^2 = ||W_j||^2 + 2s <B_j, (W A^T)_j> + s^2 B_j (A A^T) B_j^T:
        # the same value as the dense norm without ever building the [out x in] matrix B A.
        W = self.base.weight.float()
        A, B, s = self.lora_A.float(), self.lora_B.float(), self.scaling
        cross = (B * (W @ A.T)).sum(dim=1)
        quad = ((B @ (A @ A.T)) * B).sum(dim=1)
        sq_norm = self.weight_sq_norm + 2 * s * cross + s * s * quad
        return sq_norm.clamp_min(0).sqrt().clamp_min(_NORM_FLOOR)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = (self.magnitude / self.weight_norm()).to(x.dtype)  # m / ||W + sBA||, divided in fp32
        base_out = self.base(x)  # W x + b
        bias = self.base.bias
        if self.training and isinstance(self.dropout, nn.Dropout):
            # PEFT's formula with dropout: the base path sees x, the adapted path sees dropout(x):
            # y = W x + b + (g - 1) W dropout(x) + g s B A dropout(x)
            x_drop = self.dropout(x)
            return base_out + (g - 1) * F.linear(x_drop, self.base.weight) + g * self.scaling * self.lora(x_drop)
        # Without dropout that is g (W x + s B A x) + b, reusing the base output instead of a second matmul.
        without_bias = base_out if bias is None else base_out - bias
        out = g * (without_bias + self.scaling * self.lora(x))
        return out if bias is None else out + bias

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        direction = self.base.weight.float() + self.scaling * (self.lora_B @ self.lora_A)
        g = self.magnitude / self.weight_norm()
        return (g[:, None] * direction).to(self.base.weight.dtype)
