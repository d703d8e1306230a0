"""DoRA and LoRA adapters written from scratch, saved in PEFT's format.

- `config.py`: what an adapter is, as immutable values (its shape; the record saved beside it).
- `dora.py`, `lora.py`: the layers; the DoRA formula lives in `dora.py`.
- `inject.py`: putting adapters into a model, finding them, merging them into the base weights.
- `peft_format.py`: PEFT's files (config, weights, key names), saving and loading.
- `fingerprint.py`: the sketch of the base weights that tells a wrong base model apart.
"""

from .config import DEFAULT_TARGETS, AdapterConfig, AdapterNotes, AdapterRecord
from .dora import DoRALinear
from .inject import (
    adapter_modules,
    adapter_parameters,
    adapter_record,
    add_adapters,
    check_adapter_fits,
    get_adapter_config,
    merge_adapters,
    note_on_adapter,
    target_module_names,
)
from .lora import LoRALinear
from .peft_format import (
    adapter_state_dict,
    copy_adapter_tensors,
    load_adapter,
    read_adapter_config,
    read_adapter_record,
    save_adapter,
)

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterConfig",
    "AdapterNotes",
    "AdapterRecord",
    "DoRALinear",
    "LoRALinear",
    "adapter_modules",
    "adapter_parameters",
    "adapter_record",
    "adapter_state_dict",
    "add_adapters",
    "check_adapter_fits",
    "copy_adapter_tensors",
    "get_adapter_config",
    "load_adapter",
    "merge_adapters",
    "note_on_adapter",
    "read_adapter_config",
    "read_adapter_record",
    "save_adapter",
    "target_module_names",
]
