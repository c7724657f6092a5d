"""Where a run's precision is decided: one rule, imported by the training loop and the memory
estimate alike (so the estimate sizes the dtypes the run will really use).

`resolve_precision(cfg, device)` turns `cfg.precision` (auto, fp32, bf16, fp16) into the
autocast dtype and the dtype the frozen base is loaded in; `stores_frozen_linears_in_bf16`
says whether the loop then keeps the frozen linear weights in bf16 on top of that.
"""

from __future__ import annotations

import torch

from lora_studio.config import TrainConfig
from lora_studio.methods import get_method
from lora_studio.speed import bf16_pays


def resolve_precision(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype or None, dtype the frozen base is loaded in)."""
    precision = cfg.precision
    if device.type != "cuda":
        if precision == "fp16":
            raise ValueError("precision fp16 needs a GPU; use fp32 (or bf16) on CPU")
        if precision == "auto":  # bf16 where its products measure faster (AMX, Zen 4), not merely exist
            precision = "bf16" if cfg.quantize is None and bf16_pays(device) else "fp32"
        # Loaded in fp32; see stores_frozen_linears_in_bf16 for the frozen linears.
        return (torch.bfloat16 if precision == "bf16" else None), torch.float32
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, torch.float32
    if precision == "fp16":  # fp32 master weights in the base too: fp16 weights overflow easily
        return torch.float16, torch.float32
    # A method that writes the base after each step (Delta-LoRA) needs it in full precision.
    return torch.bfloat16, (torch.float32 if _writes_base(cfg) else torch.bfloat16)


def stores_frozen_linears_in_bf16(cfg: TrainConfig, autocast: torch.dtype | None, base_dtype: torch.dtype) -> bool:
    """Whether the frozen linear weights, loaded in fp32, are stored in bf16: autocast rounds
    them to bf16 anyway (same products, half the memory), unless the base must stay exact
    (a method that writes it, a merge at the end) or is quantized."""
    return (autocast == torch.bfloat16 and base_dtype == torch.float32
            and not (_writes_base(cfg) or cfg.merge or cfg.quantize))


def _writes_base(cfg: TrainConfig) -> bool:
    return get_method(cfg.method).after_step is not None
