"""DoRA and LoRA adapters written from scratch, saved in PEFT's format.

The DoRA formula lives in `dora.py`; `inject.py` puts adapters into a model and reads/writes PEFT files.
"""

from .dora import DoRALinear
from .inject import (
    DEFAULT_TARGETS,
    AdapterConfig,
    add_adapters,
    adapter_parameters,
    adapter_state_dict,
    get_adapter_config,
    load_adapter,
    merge_adapters,
    read_adapter_config,
    save_adapter,
    target_module_names,
)
from .lora import LoRALinear

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterConfig",
    "DoRALinear",
    "LoRALinear",
    "add_adapters",
    "adapter_parameters",
    "adapter_state_dict",
    "get_adapter_config",
    "load_adapter",
    "merge_adapters",
    "read_adapter_config",
    "save_adapter",
    "target_module_names",
]
