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

from ..hardware import fp32_or_wider
from .lora import LowRankAdapter

# A row of W that is all zeros has m = 0 and norm 0; the floor turns 0/0 into 0 instead of NaN.
_NORM_FLOOR = 1e-12


class DoRALinear(LowRankAdapter):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base, rank, alpha, dropout, use_rslora)
        weight_sq = fp32_or_wider(base.weight.detach()).pow(2).sum(dim=1)
        # ||W||^2 per row never changes (W is frozen): keep it, non-persistent, for the factored norm below.
        self.register_buffer("weight_sq_norm", weight_sq, persistent=False)
        self.magnitude = nn.Parameter(weight_sq.sqrt())
        self._norm: torch.Tensor | None = None
        self._norm_key: tuple | None = None
        self.cache_norm = True  # FSDP turns it off, see weight_norm

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, fp32, detached; recomputed only after A, B or W change.

        Tensor version counters move on every in-place update (optimizer steps, load_state_dict), so the
        cached norm is reused across gradient accumulation, activation recomputation and evaluation. FSDP
        instead gathers A, B and W into new storage before every forward without moving their version counters,
        so only their addresses would tell a change, and an address can come back after an update: a sharded
        model sets `cache_norm = False` (`distributed.shard_decoder_layers`) and the norm is computed each time.
        """
        if not self.cache_norm:
            return self._compute_weight_norm()
        key = tuple((p._version, p.data_ptr()) for p in (self.lora_A, self.lora_B, self.base.weight))
        if key != self._norm_key:
            if self._norm_key is None or key[2] != self._norm_key[2]:  # W itself changed (loaded, moved)
                self.weight_sq_norm = fp32_or_wider(self.base.weight.detach()).pow(2).sum(dim=1)
            self._norm = self._compute_weight_norm()
            self._norm_key = key
        return self._norm

    @torch.no_grad()
    def _compute_weight_norm(self) -> torch.Tensor:
        # ||W_j + s (BA)_j||^2 = ||W_j||^2 + 2s <B_j, (W A^T)_j> + s^2 B_j (A A^T) B_j^T:
        # the same value as the dense norm without ever building the [out x in] matrix B A.
        W = fp32_or_wider(self.base.weight)
        A, B, s = fp32_or_wider(self.lora_A), fp32_or_wider(self.lora_B), self.scaling
        cross = (B * (W @ A.T)).sum(dim=1)
        quad = ((B @ (A @ A.T)) * B).sum(dim=1)
        sq_norm = self.weight_sq_norm + 2 * s * cross + s * s * quad
        return sq_norm.clamp_min(0).sqrt().clamp_min(_NORM_FLOOR)

    def scale(self) -> torch.Tensor:
        """g = m / ||W + sBA|| per output row, in fp32 (or wider); gradients reach m through it, never the norm."""
        return self.magnitude / self.weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.scale()
        bias = self.base.bias
        if self.training and isinstance(self.dropout, nn.Dropout):
            g = g.to(x.dtype)
            base_out = self.base(x)  # W x + b
            # PEFT's formula with dropout: the base path sees x, the adapted path sees dropout(x):
            # y = W x + b + (g - 1) W dropout(x) + g s B A dropout(x)
            x_drop = self.dropout(x)
            return base_out + (g - 1) * F.linear(x_drop, self.base.weight) + g * self.scaling * self.lora(x_drop)
        # Without dropout that is g (W x + s B A x) + b: one fused autograd step (below) instead of five.
        return DoRAFunction.apply(x, self.base.weight, bias, self.lora_A, self.lora_B, g, self.scaling)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        direction = fp32_or_wider(self.base.weight) + self.scaling * (self.lora_B @ self.lora_A)
        return (self.scale()[:, None] * direction).to(self.base.weight.dtype)


class DoRAFunction(torch.autograd.Function):
    """out = g * (x W^T + s (x A^T) B^T) + b, with the gradients written out.

    Plain autograd would keep the base output, the LoRA output and their sum as separate tensors and run
    five elementwise passes; here the LoRA term is accumulated into the base output in place (addmm), the
    composition is one multiply, and backward needs only y = x W^T + s x A^T B^T (for d g, a reduction)
    and the small u = x A^T. Matmuls run in the activation dtype (bf16 under autocast); g and its gradient
    stay fp32. The norm inside g is detached by the caller, so d g flows to m only (paper, section 4.3).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, g, scaling):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            A, B = lora_A.to(dtype), lora_B.to(dtype)
            u = x2 @ A.T
            y = torch.addmm(x2 @ weight.to(dtype).T, u, B.T, alpha=scaling)
            out = y * g.to(dtype)
            if bias is not None:
                out = out + bias.to(dtype)
        ctx.save_for_backward(x2, weight, A, B, u, y, g)
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, x.shape, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, A, B, u, y, g = ctx.saved_tensors
        s = ctx.scaling
        d_out = grad_out.reshape(-1, grad_out.shape[-1]).to(y.dtype)
        wide = g.dtype  # the adapter parameters' dtype: fp32, or fp64 for an fp64 model
        d_g = torch.sum(d_out * y, dim=0, dtype=wide)  # summed in fp32 (no fp32 copies of the two)
        d_y = d_out * g.to(y.dtype)
        d_u = d_y @ B  # [tokens, r]
        d_B = s * (d_y.T @ u).to(wide)
        d_A = s * (d_u.T @ x2).to(wide)
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = torch.addmm(d_y @ weight.to(y.dtype), d_u, A, alpha=s).view(ctx.x_shape).to(ctx.x_dtype)
        return d_x, None, None, d_A, d_B, d_g, None  # A, B and m are parameters of g's dtype
