"""Put adapters into a model, and save/load/merge them in PEFT's on-disk format.

PEFT's format is two files: `adapter_config.json` (a LoraConfig) and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight`, `.lora_B.weight` and, for DoRA, `.lora_magnitude_vector`.
Writing exactly that lets `peft.PeftModel.from_pretrained` and the Hub's tooling read our adapters.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError
from ..files import atomic_path, write_atomically
from .dora import DoRALinear
from .lora import LoRALinear, LowRankAdapter

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterConfig:
    method: str = "dora"  # "dora" | "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False
    base_model_id: str | None = None
    extra: dict = field(default_factory=dict)  # doratweet settings kept beside PEFT's (prompt, labels)

    def to_peft(self) -> dict:
        """The fields of PEFT's LoraConfig that describe this adapter; PEFT fills in the rest itself."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_id,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(self.targets),
            "use_dora": self.method == "dora",
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "doratweet": self.extra,
        }

    @classmethod
    def from_peft(cls, raw: dict, where: str) -> "AdapterConfig":
        if raw.get("peft_type", "LORA") != "LORA":
            raise UserError(f"{where}: peft_type {raw.get('peft_type')!r} is not a LoRA/DoRA adapter")
        for unsupported in ("rank_pattern", "alpha_pattern"):
            if raw.get(unsupported):
                raise UserError(f"{where}: per-module {unsupported} is not supported; use one rank/alpha for all")
        if raw.get("modules_to_save"):
            raise UserError(f"{where}: modules_to_save is not supported (the adapter also trains full modules)")
        if raw.get("bias", "none") != "none" or raw.get("lora_bias"):
            raise UserError(f"{where}: adapters with trained biases are not supported")
        _check_fields(raw, where)
        targets = raw["target_modules"]
        return cls(
            method="dora" if raw.get("use_dora") else "lora",
            rank=int(raw["r"]),
            alpha=float(raw["lora_alpha"]),
            dropout=float(raw.get("lora_dropout") or 0.0),
            targets=(targets,) if isinstance(targets, str) else tuple(targets),
            use_rslora=bool(raw.get("use_rslora")),
            base_model_id=raw.get("base_model_name_or_path"),
            extra=raw.get("doratweet") or {},
        )


def _check_fields(raw: dict, where: str) -> None:
    """The fields we read, checked before use: a hand-edited or foreign config gets one line, not a KeyError."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    targets = raw.get("target_modules")
    checks = [
        ("r", isinstance(raw.get("r"), int) and not isinstance(raw.get("r"), bool) and raw.get("r") >= 1,
         "a whole number, 1 or more"),
        ("lora_alpha", number(raw.get("lora_alpha")) and raw.get("lora_alpha") > 0, "a positive number"),
        ("lora_dropout", raw.get("lora_dropout") is None or (number(raw["lora_dropout"]) and 0 <= raw["lora_dropout"] < 1),
         "a number in [0, 1)"),
        ("target_modules", (isinstance(targets, str) and targets) or (isinstance(targets, list) and targets
                                                                       and all(isinstance(t, str) for t in targets)),
         "a non-empty list of module names"),
        ("use_dora", isinstance(raw.get("use_dora", False), bool), "true or false"),
        ("doratweet", isinstance(raw.get("doratweet") or {}, dict), "an object"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise UserError(f"{where}: {name} is {raw.get(name)!r}, expected {expected}; is it a PEFT LoRA/DoRA adapter "
                            "config? Re-save the adapter or fix the field")


def add_adapters(
    model: nn.Module,
    method: str = "dora",
    rank: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS,
    use_rslora: bool = False,
) -> nn.Module:
    """Replace the target linears with DoRA/LoRA wrappers in place and freeze everything else.

    `targets` are module-name suffixes (`q_proj` matches `model.layers.3.self_attn.q_proj`), or one string
    that is a regular expression over full module names (PEFT's convention).
    """
    if method not in ("dora", "lora"):
        raise UserError(f"--method {method!r}: choose dora or lora")
    if rank < 1:
        raise UserError(f"--rank {rank}: must be at least 1")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"--dropout {dropout}: must be in [0, 1)")
    if get_adapter_config(model) is not None:
        raise UserError("this model already has adapters; load a fresh base model")
    names = target_module_names(model, targets)
    wrapper = DoRALinear if method == "dora" else LoRALinear
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, child = _parent(model, name)
        setattr(parent, child, wrapper(getattr(parent, child), rank, alpha, dropout, use_rslora))
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    # Taken now, while the base weights are whole (FSDP shards them later); save_adapter writes it.
    fingerprint = {"base_fingerprint": base_fingerprint(model)}
    model.doratweet_adapter = AdapterConfig(method, rank, float(alpha), dropout, targets, use_rslora, extra=fingerprint)
    return model


def get_adapter_config(model: nn.Module) -> AdapterConfig | None:
    return getattr(model, "doratweet_adapter", None)


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankAdapter)}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in adapter_modules(model).values() for p in _own_parameters(m).values()]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names."""
    state = {}
    for name, module in adapter_modules(model).items():
        for own, tensor in _own_parameters(module).items():
            state[_peft_key(name, own)] = tensor.detach().contiguous()
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_id: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors; each file appears whole or not at all."""
    config = get_adapter_config(model)
    assert config is not None, "save_adapter needs a model with adapters (add_adapters or load_adapter)"
    if base_model_id is not None:
        config.base_model_id = base_model_id
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_atomically(path / CONFIG_FILE, json.dumps(config.to_peft(), indent=2) + "\n")
    return path


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"--adapter {path}: no {CONFIG_FILE} there; pass the folder that holds the adapter")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_file}: not valid JSON ({err}); re-save the adapter") from err
    if not isinstance(raw, dict):
        raise UserError(f"{config_file}: expected a JSON object (a PEFT LoraConfig), found {type(raw).__name__}")
    return AdapterConfig.from_peft(raw, str(config_file))


def load_adapter(model: nn.Module, path: str | os.PathLike, dropout: float | None = None) -> nn.Module:
    """Add the adapter saved at `path` (by doratweet or by PEFT) to a base model without adapters.
    `dropout` replaces the saved one, for training the adapter further."""
    config = read_adapter_config(path)
    weights_file = Path(path) / WEIGHTS_FILE
    if not weights_file.is_file():
        raise UserError(f"--adapter {path}: {WEIGHTS_FILE} is missing")
    dropout = config.dropout if dropout is None else dropout
    add_adapters(model, config.method, config.rank, config.alpha, dropout, config.targets, config.use_rslora)
    get_adapter_config(model).base_model_id = config.base_model_id
    get_adapter_config(model).extra = {**get_adapter_config(model).extra, **config.extra}
    _check_base_model(model, config, weights_file)
    try:
        saved = {_normalise_key(k): v for k, v in load_file(weights_file).items()}
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(f"{weights_file}: not a readable safetensors file ({err}); re-save or re-download it") from err
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(
            f"{weights_file}: {len(missing)} adapter tensors missing and {len(unexpected)} not in this model "
            f"(e.g. {example}); wrong base model?"
        )
    copy_adapter_tensors(model, saved, weights_file)
    return model


def copy_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Copy `tensors` (named as `adapter_state_dict` names them) into the model's adapter weights, in place: the
    one way an adapter folder, a run's best adapter and a checkpoint put weights into a model."""
    with torch.no_grad():
        for key, target in adapter_state_dict(model).items():
            if tensors[key].shape != target.shape:
                raise UserError(
                    f"{source}: {key} has shape {tuple(tensors[key].shape)}, the model needs "
                    f"{tuple(target.shape)}; the adapter was trained on another base model"
                )
            target.copy_(tensors[key])


_FINGERPRINT_MODULES = 4  # adapted linears sampled
_FINGERPRINT_ROWS = 16  # rows of each, projected on a fixed random +-1 vector


def base_fingerprint(model: nn.Module) -> dict:
    """A small sketch of the frozen base weights, saved with the adapter so that loading it onto a different model
    of the same shape is an error instead of silently garbage labels. Random projections of a few weight rows:
    quantisation (the embedded Q4 GGUF vs the original weights) moves them by a few percent, another model by 100%."""
    modules = sorted(adapter_modules(model).items())[:_FINGERPRINT_MODULES]
    sketch = {name: [float(f"{x:.6g}") for x in _row_sketch(m.base.weight)] for name, m in modules}
    return {"rows": _FINGERPRINT_ROWS, "sketch": sketch}


def _row_sketch(weight: torch.Tensor) -> list[float]:
    signs = torch.randint(0, 2, (weight.shape[1],), generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    return (weight[:_FINGERPRINT_ROWS].detach().float().cpu() @ signs).tolist()


def _check_base_model(model: nn.Module, config: AdapterConfig, weights_file: Path) -> None:
    saved = (config.extra or {}).get("base_fingerprint")
    if not isinstance(saved, dict) or not isinstance(saved.get("sketch"), dict):
        return  # adapters written by PEFT or older doratweet versions carry none
    modules = adapter_modules(model)
    for name, values in saved["sketch"].items():
        if name not in modules:
            continue  # the tensor-name check below reports a different layout
        now = torch.tensor(_row_sketch(modules[name].base.weight), dtype=torch.float64)
        then = torch.tensor(values, dtype=torch.float64)
        if now.shape != then.shape or torch.nn.functional.cosine_similarity(now, then, dim=0) < 0.9:
            raise UserError(
                f"{weights_file}: this adapter was trained on other base weights ({config.base_model_id or 'unknown'}; "
                f"{name} differs), so its labels would be garbage; pass --model with the base model it was trained on"
            )


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base linear, leaving a plain transformers model."""
    for name, module in adapter_modules(model).items():
        base = module.base
        base.weight.data = module.merged_weight()
        parent, child = _parent(model, name)
        setattr(parent, child, base)
    if hasattr(model, "doratweet_adapter"):
        del model.doratweet_adapter
    return model


def _adaptable_linears(model: nn.Module) -> list[str]:
    """Full names of the linears an adapter may wrap. Never the output head: in small models it is the input
    embedding matrix itself (tied), so adapting it would also change the embeddings, and a merge would fold the
    head's update into them; PEFT does not target it by default either."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def target_module_names(model: nn.Module, targets) -> list[str]:
    """Full names of the linears `targets` selects; a one-line error lists the model's adaptable linears when one
    is unknown, or is a module that cannot be adapted (the output head, an embedding, an activation)."""
    linears = _adaptable_linears(model)
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name in linears})
    listing = f"this model's linear modules are: {', '.join(leaf_names) or '(none an adapter can wrap)'}"
    if isinstance(targets, str):
        names = [n for n in linears if re.fullmatch(targets, n)]
        if not names:
            raise UserError(f"--targets {targets!r} matches no linear module; {listing}")
        return names
    if not targets:
        raise UserError(f"--targets: unknown module name(s) (none given); {listing}")
    unknown = [t for t in targets if t not in leaf_names]
    other_modules = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if name}
    for target in unknown:
        if target in other_modules and other_modules[target] is model.get_output_embeddings():
            raise UserError(f"--targets {target}: the output head cannot be adapted (it shares its weights with the "
                            f"input embeddings in small models); {listing}")
        if target in other_modules:
            kind = type(other_modules[target]).__name__
            raise UserError(f"--targets {target}: is a{'n' if kind[0] in 'AEIOU' else ''} {kind}, not a linear "
                            f"layer, and only linear layers take adapters; {listing}")
    if unknown:
        raise UserError(f"--targets: unknown module name(s) {', '.join(unknown)}; {listing}")
    return [n for n in linears if n.rsplit(".", 1)[-1] in targets]


def check_rank_fits(model: nn.Module, targets, rank: int) -> None:
    """Refuse a rank above what the adapted layers allow: a rank-r update of an n-by-m weight has rank at most
    min(n, m), so a larger r only adds memory (`--rank 100000` asked for 40 GB)."""
    layers = {name: model.get_submodule(name) for name in target_module_names(model, targets)}
    name, narrowest = min(layers.items(), key=lambda item: min(item[1].in_features, item[1].out_features))
    largest = min(narrowest.in_features, narrowest.out_features)
    if rank > largest:
        raise UserError(f"--rank {rank}: larger than the adapted layers allow (at most {largest}: "
                        f"{name.rsplit('.', 1)[-1]} maps {narrowest.in_features} features to "
                        f"{narrowest.out_features}); choose {largest} or less")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _own_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    own = {"lora_A": module.lora_A, "lora_B": module.lora_B}
    if isinstance(module, DoRALinear):
        own["magnitude"] = module.magnitude
    return own


def _peft_key(module_name: str, own: str) -> str:
    suffix = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}[own]
    return f"{_PEFT_PREFIX}{module_name}.{suffix}"


def _normalise_key(key: str) -> str:
    # Older PEFT versions saved the magnitude as `lora_magnitude_vector.weight`; some tools drop the prefix.
    if key.endswith("lora_magnitude_vector.weight"):
        key = key[: -len(".weight")]
    return key if key.startswith(_PEFT_PREFIX) else _PEFT_PREFIX + key
