"""Everything decided once per run, before anything is loaded: the `Plan`.

`make_plan(cfg)` is the only place within a run that resolves the config (`cfg.resolved()`),
looks the method up, checks the config against it and decides the precision; the loop, the
memory estimate and the checkpoint code read the answers from the Plan and never decide again.

Strategy (several processes): `plan.strategy` is `single` (one process), `ddp` or `fsdp`, with
`auto` decided from the memory estimate (`memory.pick_strategy`) and `fsdp` refused where the
method or a setting cannot shard (`fsdp.fsdp_refusal`) [FSDP hook 0].

Precision: `resolve_precision(cfg, device)` turns `cfg.precision` (auto, fp32, bf16, fp16) into
the autocast dtype and the dtype the frozen base is loaded in; `stores_frozen_linears_in_bf16`
says whether the loop then keeps the frozen linear weights in bf16 on top of that.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from lora_studio.config import TrainConfig
from lora_studio.engine.speed import bf16_pays
from lora_studio.methods import Method, get_method
from lora_studio.methods.base import check_config


@dataclass(frozen=True)
class Plan:
    """One run's decisions; frozen, made once by `make_plan`."""

    cfg: TrainConfig
    """The resolved config (method defaults filled in)."""
    method: Method
    """The registry entry of `cfg.method`."""
    device: torch.device
    """Where this process trains (its GPU under torchrun, else cuda:0 or the CPU)."""
    world: int
    """Processes in the job (torchrun ranks); 1 without torchrun."""
    autocast_dtype: torch.dtype | None
    """bf16/fp16 autocast, or None for plain fp32."""
    base_dtype: torch.dtype
    """The dtype the frozen base model is loaded in."""
    frozen_linears_bf16: bool
    """Whether the frozen linear weights are then stored in bf16 (see `stores_frozen_linears_in_bf16`)."""
    micro_batch: int
    """Sequences per forward pass at most: batch_size split over grad_accum_steps and the ranks."""
    eval_batch: int
    """Sequences per forward pass of the evaluation (per rank)."""
    strategy: str = "single"
    """How the ranks share the work: `single` (one process), `ddp` or `fsdp` (`cfg.strategy` with
    `auto` decided); the loop, the estimate and the checkpoints read this, never `cfg.strategy`."""

    @property
    def sharded(self) -> bool:
        """FSDP2: weights, gradients and optimizer state sharded over the ranks (lora_studio/engine/fsdp.py)."""
        return self.strategy == "fsdp"

    @property
    def precision(self) -> str:
        """`float32`, `bfloat16` or `float16`: what the status file shows."""
        return str(self.autocast_dtype or torch.float32).replace("torch.", "")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def micro_batch_size(batch_size: int, grad_accum_steps: int, world: int = 1) -> int:
    """The largest micro-batch of one step: `batch_size` over `grad_accum_steps` micro-batches on `world` ranks."""
    return max(1, math.ceil(batch_size / (grad_accum_steps * max(1, world))))


def make_plan(
    cfg: TrainConfig, device: torch.device | str | None = None, world: int = 1, capacity_mb: float | None = None
) -> Plan:
    """Resolve `cfg`, check it against its method (ValueError saying why and what to pick
    instead), decide the precision for `device` (default: the GPU if there is one) and, with
    `world` > 1, the strategy (`capacity_mb`: one rank's memory for `auto`; default: the device's)."""
    cfg = cfg.resolved()
    method = get_method(cfg.method)
    check_config(method, cfg)  # impossible combinations fail before anything is loaded
    device = torch.device(device) if device is not None else default_device()
    autocast, base_dtype = resolve_precision(cfg, device)
    plan = Plan(
        cfg=cfg,
        method=method,
        device=device,
        world=world,
        autocast_dtype=autocast,
        base_dtype=base_dtype,
        frozen_linears_bf16=stores_frozen_linears_in_bf16(cfg, autocast, base_dtype),
        micro_batch=micro_batch_size(cfg.batch_size, cfg.grad_accum_steps, world),
        eval_batch=max(1, cfg.batch_size // cfg.grad_accum_steps),
    )
    if world <= 1:
        return plan
    # [FSDP hook 0] auto decided from the memory estimate; fsdp refused where it cannot work
    from lora_studio.engine.fsdp import fsdp_refusal
    from lora_studio.engine.memory import pick_strategy

    strategy = pick_strategy(plan, capacity_mb)
    why = fsdp_refusal(method, cfg) if strategy == "fsdp" else None
    if why:
        raise ValueError(why)
    return dataclasses.replace(plan, strategy=strategy)


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
    return torch.bfloat16, (torch.float32 if get_method(cfg.method).writes_base else torch.bfloat16)


def stores_frozen_linears_in_bf16(cfg: TrainConfig, autocast: torch.dtype | None, base_dtype: torch.dtype) -> bool:
    """Whether the frozen linear weights, loaded in fp32, are stored in bf16: autocast rounds
    them to bf16 anyway (same products, half the memory), unless the base must stay exact
    (a method that writes it, a merge at the end) or is quantized."""
    return (autocast == torch.bfloat16 and base_dtype == torch.float32
            and not (get_method(cfg.method).writes_base or cfg.merge or cfg.quantize))
