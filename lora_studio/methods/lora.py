"""LoRA — Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.

    y = W0 x + b + s · B (A (dropout(x))),   s = alpha / r   (rsLoRA: s = alpha / sqrt(r))

W0 (d_out × d_in) stays frozen; A (r × d_in) starts kaiming-uniform(a=√5), i.e. U(±1/√d_in),
and B (d_out × r) starts at zero, so the adapted model equals the base at step 0.
Merge: W ← W0 + s · B A. BA is never formed while training: the adapter path computes
(x Aᵀ) Bᵀ, r numbers per token.

Defaults: rank 16, alpha 32 (α = 2r), dropout 0, lr 2e-4, every linear layer of the blocks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_studio.methods.base import AdapterLayer, Method, base_weight


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALinear(AdapterLayer):
    """A frozen linear plus s·B·A·x."""

    def __init__(
        self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__(base)
        self.rank = rank
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # No Dropout module at p=0: it would still be a call per layer, and keeps no mask.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_term(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A dropout(x): (..., d_in) -> (..., d_out), in the adapter's dtype."""
        if not torch.is_autocast_enabled(x.device.type):  # autocast casts x itself: a bf16 x made
            x = x.to(self.lora_A.dtype)  # fp32 here would only be cast back (5 % of a bf16 step)
        z = F.linear(self.dropout(x), self.lora_A)  # (..., r)
        return F.linear(z, self.lora_B) * self.scaling  # (..., d_out)

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.lora_term(x).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s · B A, (d_out, d_in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        w0 = base_weight(self.base)
        return w0.to(self.lora_A.dtype) + self.delta_weight()

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach()}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_A.copy_(state["lora_A.weight"])
            self.lora_B.copy_(state["lora_B.weight"])


def build_lora(base: nn.Module, cfg: Any, context: dict) -> LoRALinear:
    return LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)


LORA = Method(
    name="lora",
    title="LoRA",
    summary="Low-rank update B·A on every adapted layer: the standard, a good default.",
    paper="Hu et al. 2021, arXiv:2106.09685",
    hook="layer",
    build_layer=build_lora,
    defaults={"rank": 16, "dropout": 0.0, "lr": 2e-4, "lr_ratio": 1.0},  # alpha: 2 * rank
)
