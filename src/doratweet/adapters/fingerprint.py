"""A small sketch of the frozen base weights, saved with an adapter, so that loading the adapter onto a different
model of the same shape is an error instead of silently garbage labels.

The sketch is a random projection of a few weight rows: quantisation (the embedded Q4 GGUF against the original
weights) moves it by a few percent, another model by 100%.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

_MODULES = 4  # adapted linears sampled
_ROWS = 16  # rows of each, projected on a fixed random +-1 vector


def base_fingerprint(adapted: dict[str, nn.Module]) -> dict:
    """The sketch of the adapted linears' base weights (`adapted`: name -> adapter module)."""
    modules = sorted(adapted.items())[:_MODULES]
    sketch = {name: [float(f"{x:.6g}") for x in _row_sketch(m.base.weight)] for name, m in modules}
    return {"rows": _ROWS, "sketch": sketch}


def check_same_base(adapted: dict[str, nn.Module], saved: dict | None, base_model_id: str | None,
                    weights_file: Path) -> None:
    """Refuse an adapter whose saved sketch does not match the base weights it is being loaded onto."""
    if not isinstance(saved, dict) or not isinstance(saved.get("sketch"), dict):
        return  # adapters written by PEFT or older doratweet versions carry none
    for name, values in saved["sketch"].items():
        if name not in adapted:
            continue  # the tensor-name check of load_adapter reports a different layout
        now = torch.tensor(_row_sketch(adapted[name].base.weight), dtype=torch.float64)
        then = torch.tensor(values, dtype=torch.float64)
        if now.shape != then.shape or torch.nn.functional.cosine_similarity(now, then, dim=0) < 0.9:
            raise UserError(
                f"{weights_file}: this adapter was trained on other base weights ({base_model_id or 'unknown'}; "
                f"{name} differs), so its labels would be garbage; pass --model with the base model it was trained on"
            )


def _row_sketch(weight: torch.Tensor) -> list[float]:
    signs = torch.randint(0, 2, (weight.shape[1],), generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    return (weight[:_ROWS].detach().float().cpu() @ signs).tolist()
