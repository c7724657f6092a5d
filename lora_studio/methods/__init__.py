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
from lora_studio.methods.delta_lora import DELTA_LORA
from lora_studio.methods.dora import DORA
from lora_studio.methods.lora import LORA
from lora_studio.methods.lora_fa import LORA_FA
from lora_studio.methods.lora_plus import LORA_PLUS
from lora_studio.methods.lora_pro import LORA_PRO
from lora_studio.methods.vera import VERA

REGISTRY: dict[str, Method] = {
    m.name: m for m in (LORA, DORA, VERA, LORA_PLUS, LORA_FA, LORA_PRO, DELTA_LORA)
}


def method_for_peft_config(config: dict) -> Method | None:
    """The method a peft adapter_config.json describes: its peft_type and the fields a method sets
    (DoRA's use_dora); the most specific match, LoRA for a plain one; None for other peft types."""
    found = [m for m in REGISTRY.values() if m.peft_type == config.get("peft_type")
             and all(config.get(k) == v for k, v in m.peft_fields.items())]  # fmt: skip
    return max(found, key=lambda m: len(m.peft_fields), default=None)


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
    "method_for_peft_config",
    "trainable_parameters",
]
