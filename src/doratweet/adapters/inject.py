"""Put adapters into a model, find them again, and fold them into the base weights.

The model carries what was put in as an `AdapterRecord` (`adapter_record(model)`): the shape, and the notes that
saving writes beside the weights (peft_format.py).
"""

from __future__ import annotations

import re
from dataclasses import replace

from torch import nn

from ..errors import UserError
from .config import AdapterConfig, AdapterNotes, AdapterRecord, layer_indices, layers_spec
from .dora import DoRALinear
from .fingerprint import base_fingerprint
from .lora import LoRALinear, LowRankAdapter

_RECORD = "doratweet_adapter"  # the attribute of a model with adapters that holds its AdapterRecord


def add_adapters(model: nn.Module, config: AdapterConfig | None = None, **shape) -> nn.Module:
    """Replace the target linears with DoRA/LoRA wrappers in place and freeze everything else.

    `config` is the adapter's shape; without it, `shape` names AdapterConfig fields (`rank=8, targets=...`) and
    the others keep their defaults."""
    if config is None:
        config = AdapterConfig(**shape)
    elif shape:
        raise TypeError("add_adapters: pass an AdapterConfig or its fields, not both")
    if adapter_record(model) is not None:
        raise UserError("this model already has adapters; load a fresh base model")
    names = target_module_names(model, config.targets, config.layers)
    wrapper = DoRALinear if config.method == "dora" else LoRALinear
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, child = _parent(model, name)
        setattr(parent, child, wrapper(getattr(parent, child), config.rank, config.alpha, config.dropout,
                                       config.use_rslora))
    if config.layers != "all":  # saved as the layers themselves: top:K means other layers in another model
        config = replace(config, layers=layers_spec(adapted_layer_indices(model, config.layers)))
    # Taken now, while the base weights are whole (FSDP shards them later); save_adapter writes it.
    notes = AdapterNotes(base_fingerprint=base_fingerprint(adapter_modules(model)))
    set_adapter_record(model, AdapterRecord(config, notes=notes))
    return model


def adapter_record(model: nn.Module) -> AdapterRecord | None:
    return getattr(model, _RECORD, None)


def set_adapter_record(model: nn.Module, record: AdapterRecord) -> None:
    setattr(model, _RECORD, record)


def get_adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The shape of the model's adapters, or None when it has none."""
    record = adapter_record(model)
    return record.config if record is not None else None


def note_on_adapter(model: nn.Module, notes: AdapterNotes) -> None:
    """Add `notes` (the fields it sets) to what saving the model's adapter writes beside it."""
    record = adapter_record(model)
    set_adapter_record(model, replace(record, notes=record.notes.updated(notes)))


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankAdapter)}


def own_parameters(module: LowRankAdapter) -> dict[str, nn.Parameter]:
    """An adapter module's trainable tensors: A and B, and DoRA's magnitude."""
    own = {"lora_A": module.lora_A, "lora_B": module.lora_B}
    if isinstance(module, DoRALinear):
        own["magnitude"] = module.magnitude
    return own


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in adapter_modules(model).values() for p in own_parameters(m).values()]


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base linear, leaving a plain transformers model."""
    for name, module in adapter_modules(model).items():
        base = module.base
        base.weight.data = module.merged_weight()
        parent, child = _parent(model, name)
        setattr(parent, child, base)
    if hasattr(model, _RECORD):
        delattr(model, _RECORD)
    return model


def _adaptable_linears(model: nn.Module) -> list[str]:
    """Full names of the linears an adapter may wrap. Never the output head: in small models it is the input
    embedding matrix itself (tied), so adapting it would also change the embeddings, and a merge would fold the
    head's update into them; PEFT does not target it by default either."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (transformers names it `layers` in LLaMA-like models)."""
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"--layers: cannot find the decoder layers of {type(model).__name__}; use --layers all")
    return layers


def adapted_layer_indices(model: nn.Module, spec: str) -> tuple[int, ...]:
    return layer_indices(spec, len(decoder_layers(model)))


def target_module_names(model: nn.Module, targets, layers: str = "all") -> list[str]:
    """Full names of the linears `targets` selects, in the decoder `layers` (see AdapterConfig.layers); a one-line
    error lists the model's adaptable linears when one is unknown, or is a module that cannot be adapted (the
    output head, an embedding, an activation)."""
    names = _target_module_names(model, targets)
    if layers == "all":
        return names
    chosen = {id(layer) for i, layer in enumerate(decoder_layers(model)) if i in adapted_layer_indices(model, layers)}
    inside = {name for name, module in model.named_modules() if id(module) in chosen}
    return [n for n in names if any(n.startswith(layer + ".") for layer in inside)]


def _target_module_names(model: nn.Module, targets) -> list[str]:
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


def check_adapter_fits(model: nn.Module, config: AdapterConfig) -> None:
    """Refuse, before anything is trained, targets the model does not have and a rank above what the adapted
    layers allow: a rank-r update of an n-by-m weight has rank at most min(n, m), so a larger r only adds memory
    (`--rank 100000` asked for 40 GB)."""
    layers = {name: model.get_submodule(name) for name in target_module_names(model, config.targets, config.layers)}
    name, narrowest = min(layers.items(), key=lambda item: min(item[1].in_features, item[1].out_features))
    largest = min(narrowest.in_features, narrowest.out_features)
    if config.rank > largest:
        raise UserError(f"--rank {config.rank}: larger than the adapted layers allow (at most {largest}: "
                        f"{name.rsplit('.', 1)[-1]} maps {narrowest.in_features} features to "
                        f"{narrowest.out_features}); choose {largest} or less")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
