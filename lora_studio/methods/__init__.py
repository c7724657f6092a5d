"""The registry of fine-tuning methods: the CLI's `--method` choices and the UI's list.

Sorted by where they hook in (see `base.py`): layer, optimizer, after-step.
"""

from __future__ import annotations

from lora_studio.methods.base import (
    AdapterLayer,
    Method,
    adapter_layers,
    count_parameters,
    disable_adapter,
    inject_adapters,
    merge_adapters,
    trainable_parameters,
)
from lora_studio.methods.lora import LORA

REGISTRY: dict[str, Method] = {
    LORA.name: LORA,
}


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(REGISTRY)}") from None


__all__ = [
    "AdapterLayer",
    "Method",
    "REGISTRY",
    "adapter_layers",
    "count_parameters",
    "disable_adapter",
    "get_method",
    "inject_adapters",
    "merge_adapters",
    "trainable_parameters",
]
