"""Adapters on disk, in PEFT's format, so that `peft.PeftModel.from_pretrained` and the Hub's tooling read ours and
adapters trained with PEFT load here.

PEFT's format is two files: `adapter_config.json` (a LoraConfig, with doratweet's notes in a section of its own)
and `adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight`, `.lora_B.weight` and,
for DoRA, `.lora_magnitude_vector`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError
from ..files import atomic_path, write_atomically
from .config import AdapterConfig, AdapterNotes, AdapterRecord, layer_indices, layers_spec
from .fingerprint import check_same_base
from .inject import adapter_modules, adapter_record, add_adapters, own_parameters, set_adapter_record

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_PEFT_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}


# --- the config file ----------------------------------------------------------------------------------------------

def record_to_peft(record: AdapterRecord) -> dict:
    """The fields of PEFT's LoraConfig that describe this adapter (PEFT fills in the rest itself), and our notes."""
    config = record.config
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": record.base_model_id,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets) if not isinstance(config.targets, str) else config.targets,
        "use_dora": config.method == "dora",
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        **({} if config.layers == "all" else {"layers_to_transform": list(layer_indices(config.layers, _ANY)),
                                              "layers_pattern": "layers"}),
        "rank_pattern": {},
        "alpha_pattern": {},
        "doratweet": {name: list(value) if isinstance(value, tuple) else value
                      for name, value in asdict(record.notes).items() if value is not None},
    }


def record_from_peft(raw: dict, where: str) -> AdapterRecord:
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
    config = AdapterConfig(
        method="dora" if raw.get("use_dora") else "lora",
        rank=int(raw["r"]),
        alpha=float(raw["lora_alpha"]),
        dropout=float(raw.get("lora_dropout") or 0.0),
        targets=raw["target_modules"],  # a string is a regular expression (PEFT's convention), a list module names
        use_rslora=bool(raw.get("use_rslora")),
        layers=_layers_from_peft(raw.get("layers_to_transform"), where),
    )
    section = raw.get("doratweet") or {}
    notes = AdapterNotes(**{f.name: section[f.name] for f in fields(AdapterNotes) if f.name in section})
    if notes.labels is not None:
        notes = replace(notes, labels=tuple(notes.labels))
    return AdapterRecord(config, raw.get("base_model_name_or_path"), notes)


_ANY = 1 << 30  # a layer count no model reaches: an explicit --layers needs none


def _layers_from_peft(layers, where: str) -> str:
    """PEFT's layers_to_transform (one index, a list of them, or none) as a --layers value."""
    if layers is None or layers == []:
        return "all"
    layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if not (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                             for i in layers)):
        raise UserError(f"{where}: layers_to_transform is {layers!r}, expected layer indices; fix the field")
    return layers_spec(layers)


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


def read_adapter_record(path: str | os.PathLike) -> AdapterRecord:
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"--adapter {path}: no {CONFIG_FILE} there; pass the folder that holds the adapter")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_file}: not valid JSON ({err}); re-save the adapter") from err
    if not isinstance(raw, dict):
        raise UserError(f"{config_file}: expected a JSON object (a PEFT LoraConfig), found {type(raw).__name__}")
    return record_from_peft(raw, str(config_file))


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """The shape of the adapter saved at `path`."""
    return read_adapter_record(path).config


# --- the weights ----------------------------------------------------------------------------------------------------

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names."""
    state = {}
    for name, module in adapter_modules(model).items():
        for own, tensor in own_parameters(module).items():
            state[f"{_PEFT_PREFIX}{name}.{_PEFT_SUFFIX[own]}"] = tensor.detach().contiguous()
    return state


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


def _normalise_key(key: str) -> str:
    # Older PEFT versions saved the magnitude as `lora_magnitude_vector.weight`; some tools drop the prefix.
    if key.endswith("lora_magnitude_vector.weight"):
        key = key[: -len(".weight")]
    return key if key.startswith(_PEFT_PREFIX) else _PEFT_PREFIX + key


# --- saving and loading -----------------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_id: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors; each file appears whole or not at all."""
    record = adapter_record(model)
    assert record is not None, "save_adapter needs a model with adapters (add_adapters or load_adapter)"
    if base_model_id is not None:
        record = replace(record, base_model_id=base_model_id)
        set_adapter_record(model, record)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_atomically(path / CONFIG_FILE, json.dumps(record_to_peft(record), indent=2) + "\n")
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike, dropout: float | None = None) -> nn.Module:
    """Add the adapter saved at `path` (by doratweet or by PEFT) to a base model without adapters.
    `dropout` replaces the saved one, for training the adapter further."""
    saved = read_adapter_record(path)
    weights_file = Path(path) / WEIGHTS_FILE
    if not weights_file.is_file():
        raise UserError(f"--adapter {path}: {WEIGHTS_FILE} is missing")
    config = saved.config if dropout is None else replace(saved.config, dropout=dropout)
    try:
        add_adapters(model, config)
    except UserError as err:  # the adapter's own layers, not an option the user gave, do not fit this model
        if config.layers == "all" or not str(err).startswith("--layers"):
            raise
        raise UserError(f"{Path(path) / CONFIG_FILE}: its layers_to_transform ({config.layers}) do not fit this "
                        f"model ({str(err).split(': ', 1)[1]}); use the base model it was trained on "
                        "(--model)") from err
    now = adapter_record(model)
    set_adapter_record(model, AdapterRecord(config, saved.base_model_id, now.notes.updated(saved.notes)))
    check_same_base(adapter_modules(model), saved.notes.base_fingerprint, saved.base_model_id, weights_file)
    try:
        tensors = {_normalise_key(k): v for k, v in load_file(weights_file).items()}
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(f"{weights_file}: not a readable safetensors file ({err}); re-save or re-download it") from err
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(
            f"{weights_file}: {len(missing)} adapter tensors missing and {len(unexpected)} not in this model "
            f"(e.g. {example}); wrong base model?"
        )
    copy_adapter_tensors(model, tensors, weights_file)
    return model
