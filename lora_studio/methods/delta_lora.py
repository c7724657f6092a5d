"""Delta-LoRA — Zi et al. 2023, "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta
of Low-Rank Matrices", arXiv:2309.02411.

A and B train with AdamW exactly as LoRA's (dropout removed, as the paper does: the update
rule below assumes ∂L/∂W = ∂L/∂(BA) up to s, which dropout on the adapter input breaks).
After each optimizer step t past a start step K, the frozen weight also moves by the change
of the low-rank product:

    W ← W + λ · s · (B_t A_t − B_{t−1} A_{t−1})          λ = 2, K = 500 in the paper

W gets no gradient and no optimizer state: the update costs one snapshot of A and B. The
increments telescope, W_T − W_0 = λ·s·(B_T A_T − B_K A_K), so the adapted weight
W_T + s·B_T A_T equals W_0 plus an exact rank-≤2r LoRA:

    A' = [A_T; A_K] (2r × d_in),   B' = [(1+λ)·B_T | −λ·B_K] (d_out × 2r),   same s

which is what `save_adapter` writes (peft loads it as a plain LoRA of rank 2r, alpha 2r·s).
Before W has moved the export is the plain rank-r LoRA. Our loader reads it back as LoRA
layers over the untouched base (a finished adapter, not a run to resume).

Disabling the adapter while W has moved: the layer keeps A_K, B_K and the last A, B
(the two snapshots), so `disable_adapter` gives W x − λ·s·(B_t A_t − B_K A_K) x: the original
base up to float rounding (bit for bit only while W has not moved). Merge: W ← W + s·B A.
W must be a writable full-precision weight, so a 4-bit base is refused.

Options: `lambda` (λ, default 2), `start_step` (K; default: 500 as in the paper, or a tenth
of `max_steps` when that is smaller, so a short run still reaches the Delta-LoRA phase).
Defaults: rank 16, alpha 32, lr 2e-4, dropout 0 (required).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_studio.methods.base import Conv1D, Method, adapter_layers, inject_adapters, load_layer_states
from lora_studio.methods.lora import LORA, LoRALinear, lora_scaling


class DeltaLoRALinear(LoRALinear):
    """LoRA whose base weight follows the product B A after step K (see module docstring)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, lam: float, use_rslora: bool = False) -> None:
        super().__init__(base, rank, alpha, dropout=0.0, use_rslora=use_rslora)
        self.lam = float(lam)
        # (A, B) after the last step, and at step K (where W started to move): not trained,
        # not exported, but moved with the layer by .to().
        self.register_buffer("prev_A", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("prev_B", self.lora_B.detach().clone(), persistent=False)
        self.register_buffer("start_A", torch.zeros_like(self.lora_A), persistent=False)
        self.register_buffer("start_B", torch.zeros_like(self.lora_B), persistent=False)
        self.moved = False
        """True once W has been written: W = W0 + λ·s·(prev_B prev_A − start_B start_A)."""

    @torch.no_grad()
    def after_step(self, update: bool) -> None:
        """Apply W += λ·s·(B A − prev_B prev_A) when `update`, then snapshot A, B."""
        if update:
            if not self.moved:
                self.start_A.copy_(self.prev_A)
                self.start_B.copy_(self.prev_B)
                self.moved = True
            # fp32 even if called under autocast: these increments add up in W over the whole run.
            with torch.autocast(self.lora_A.device.type, enabled=False):
                delta = (self.lora_B @ self.lora_A - self.prev_B @ self.prev_A) * (self.lam * self.scaling)  # (d_out, d_in)
            weight = self.base.weight
            weight.add_((delta.T if isinstance(self.base, Conv1D) else delta).to(weight.dtype))
        self.prev_A.copy_(self.lora_A)
        self.prev_B.copy_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.moved:
            return self.base(x) - self.moved_delta(x).to(x.dtype)
        return super().forward(x)

    def moved_delta(self, x: torch.Tensor) -> torch.Tensor:
        """(W − W0) x = λ·s·(prev_B prev_A − start_B start_A) x, without a d_out × d_in matrix."""
        xa = x.to(self.prev_A.dtype)
        now = F.linear(F.linear(xa, self.prev_A), self.prev_B)
        start = F.linear(F.linear(xa, self.start_A), self.start_B)
        return (now - start) * (self.lam * self.scaling)

    def export_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') with s·B'A' = (W + s·B A) − W0: rank 2r once W moved, else (A, B)."""
        if not self.moved:
            return self.lora_A.detach(), self.lora_B.detach()
        if not (torch.equal(self.prev_A, self.lora_A) and torch.equal(self.prev_B, self.lora_B)):
            raise ValueError("A or B changed since the last Delta-LoRA step; run after_step before exporting")
        a = torch.cat([self.lora_A, self.start_A], dim=0)  # (2r, d_in)
        b = torch.cat([(1 + self.lam) * self.lora_B, -self.lam * self.start_B], dim=1)  # (d_out, 2r)
        return a.detach(), b.detach()


def start_step(cfg: Any) -> int:
    """K: the option when set, else 500 (paper), capped at a tenth of max_steps."""
    k = DELTA_LORA.option(cfg, "start_step")
    if k is not None:
        return int(k)
    max_steps = getattr(cfg, "max_steps", None)
    return min(500, max_steps // 10) if max_steps else 500


def build_delta_lora(base: nn.Module, cfg: Any, context: dict) -> DeltaLoRALinear:
    return DeltaLoRALinear(base, cfg.rank, cfg.alpha, DELTA_LORA.option(cfg, "lambda"), cfg.use_rslora)


def delta_lora_after_step(model: nn.Module, cfg: Any, step: int) -> None:
    """Called after optimizer step number `step` (1-based): W moves for step > K."""
    update = step > start_step(cfg)
    for layer in adapter_layers(model).values():
        layer.after_step(update)


def check_delta_lora(cfg: Any) -> None:
    if cfg.dropout:
        raise ValueError(
            f"delta-lora runs without dropout (got dropout={cfg.dropout}): its update of W assumes the "
            "adapter sees the same input as W (the paper removes dropout); set dropout 0, or pick lora"
        )
    k = DELTA_LORA.option(cfg, "start_step")
    if k is not None and int(k) < 0:
        raise ValueError(f"delta-lora start_step must be 0 or more (got {k})")


def export_delta_lora(model: nn.Module, settings: dict) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, layer in adapter_layers(model).items():
        a, b = layer.export_pair()
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    return tensors


def export_delta_lora_config(model: nn.Module, settings: dict, config: dict) -> dict:
    """A plain LoRA of the exported rank, scaled by the same s (alpha = rank' · s, no rsLoRA)."""
    layer = next(iter(adapter_layers(model).values()))
    rank = layer.export_pair()[0].shape[0]
    return {**config, "r": rank, "lora_alpha": rank * layer.scaling, "use_rslora": False, "lora_dropout": 0.0}


def import_delta_lora(model: nn.Module, tensors: dict[str, torch.Tensor], cfg: Any, modules: list[str]) -> set[str]:
    """Load an exported Delta-LoRA adapter as LoRA layers of its rank over the untouched base."""
    key = f"base_model.model.{modules[0]}.lora_A.weight"
    if key not in tensors:
        raise ValueError(f"layer {modules[0]} lacks lora_A.weight")
    rank = tensors[key].shape[0]
    s = lora_scaling(cfg.alpha, cfg.rank, cfg.use_rslora)  # the trained layers' scale
    inject_adapters(model, LORA, _AsLoRA(cfg, rank, s * rank))
    return load_layer_states(model, tensors)


class _AsLoRA:
    """A config view for LoRA layers of rank `rank`, alpha `alpha`, no rsLoRA, no options."""

    def __init__(self, cfg: Any, rank: int, alpha: float) -> None:
        self._cfg, self.rank, self.alpha = cfg, rank, alpha
        self.use_rslora, self.dropout, self.method_options, self.lr_ratio = False, 0.0, {}, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cfg, name)


DELTA_LORA = Method(
    name="delta-lora",
    title="Delta-LoRA",
    summary="LoRA that also moves the full weight W by the change of B·A after each step: higher-rank updates, same optimizer memory.",
    paper="Zi et al. 2023, arXiv:2309.02411",
    hook="after-step",
    build_layer=build_delta_lora,
    defaults={"rank": 16, "dropout": 0.0, "lr": 2e-4, "lr_ratio": 1.0, "lambda": 2.0, "start_step": None},
    writes_base=True,
    supports_4bit=False,
    why_not_4bit=(
        "it adds λ·s·Δ(BA) to the base weight W after every step, and an NF4 weight cannot take such small "
        "updates (re-quantizing rounds them away). Pick lora, lora-fa, lora-plus, lora-pro, dora or vera for "
        "--quantize 4bit, or train delta-lora without --quantize."
    ),
    after_step=delta_lora_after_step,
    check=check_delta_lora,
    export_state=export_delta_lora,
    export_config=export_delta_lora_config,
    import_state=import_delta_lora,
    fsdp_note=(
        "its after-step rule adds the change of B·A to the whole base weight W, a product of two "
        "sharded matrices written into a third, outside any layer's forward where FSDP2 gathers them"
    ),
)
