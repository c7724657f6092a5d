"""DoRA — Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353.

The adapted weight is split into a direction, trained by LoRA, and a per-row magnitude:

    W' = m ⊙ V / ‖V‖_row,    V = W0 + s·B A,    m ∈ R^{d_out} initialized to ‖W0‖_row

so W' = W0 at step 0 (B = 0). ‖V‖ is treated as a constant in backward (paper §4.3:
"detached from the gradient graph"), which saves memory and barely changes accuracy.
W' is never applied to the tokens; with f = m / ‖V‖ (d_out numbers) the forward is

    y = f ⊙ (W0 x + s·B A x) + b  =  W0 x + b + (f − 1) ⊙ W0 x + f ⊙ s·B A x

computed as f ⊙ ([x | z] [W0 | s·B]ᵀ) + b, z = x Aᵀ: base and LoRA term in one product,
rounded once (`LoRALinear.product`), then f in fp32, so that under bf16 neither B's nor m's
first small updates are rounded away. With dropout in training (or a base the product cannot
take), it is computed from the base output y0 = W0 x + b as peft does it (the W0 term then
recomputed on the dropped-out input, again as peft). ‖V‖ needs the d_out × d_in
matrix V once per forward, under no_grad (dequantized first on a 4-bit base).
Merge: W ← f ⊙ (W0 + s·B A), bias unchanged. Trainable: A, B, m (d_out more than LoRA).

Defaults: rank 16, alpha 32, lr 2e-4 (LoRA's: DoRA is usually run at LoRA's rate and rank;
the paper's "half the rank" setting, rank 8 at lr 1e-4, taught measurably less in one epoch:
docs/methods_table.md), dropout 0, all linear layers.
"""

from __future__ import annotations

import contextlib

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_studio.methods.base import AdapterLayer, Method, base_weight
from lora_studio.methods.lora import LoRALinear


class DoRALinear(LoRALinear):
    """LoRA plus a trained magnitude per output row, m / ‖W0 + s·B A‖_row."""

    def __init__(
        self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__(base, rank, alpha, dropout, use_rslora)
        with torch.no_grad():
            norm = self.weight_norm()  # B = 0: the row norms of W0
        self.lora_magnitude_vector = nn.Parameter(norm.clone())  # (d_out,)

    def base_w(self) -> torch.Tensor:
        """W0 as (d_out, d_in) in the adapter's dtype."""
        return base_weight(self.base).to(self.lora_A.dtype)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s·B A‖ per output row, (d_out,), outside the graph, in fp32 even under autocast:
        bf16's 8-bit mantissa would put a ~2e-3 relative error on the scale of every output row."""
        device = self.lora_A.device.type
        # (the memory estimate builds the model on `meta`, where autocast does not exist)
        with torch.autocast(device, enabled=False) if device != "meta" else contextlib.nullcontext():
            return torch.linalg.norm(self.base_w() + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._product_dtype(x)
        if dtype is None or (self.training and not isinstance(self.dropout, nn.Identity)):
            return AdapterLayer.forward(self, x)  # (with dropout in training W0 x is recomputed: `adapt`)
        self.write_spare_columns()
        scale = self.lora_magnitude_vector / self.weight_norm()  # f: (d_out,)
        # W0 x + s·B A x rounded once (`LoRALinear.product`); then the row scale and the bias
        u = self.product(x, dtype, bias=False)  # (..., d_out)
        y = u * scale  # (in f's fp32: rounded to bf16 first, f would drop m's first small updates)
        return (y if self.base.bias is None else y + self.base.bias).to(dtype)

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = self.lora_magnitude_vector / self.weight_norm()  # f: (d_out,)
        xa = x.to(self.lora_A.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            dropped = xa
            w0x = y.to(xa.dtype)  # (..., d_out)
            if self.base.bias is not None:
                w0x = w0x - self.base.bias.to(xa.dtype)
        else:
            dropped = self.dropout(xa)
            w0x = F.linear(dropped, self.base_w())
        lora = F.linear(F.linear(dropped, self.lora_A), self.lora_B) * self.scaling  # (..., d_out)
        return y + ((scale - 1) * w0x + scale * lora).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        w = self.base_w() + self.delta_weight()  # V: (d_out, d_in)
        return w * (self.lora_magnitude_vector / self.weight_norm()).unsqueeze(1)

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {**super().peft_state(), "lora_magnitude_vector": self.lora_magnitude_vector.detach()}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_peft_state(state)
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(state["lora_magnitude_vector"])


def build_dora(base: nn.Module, cfg: Any, context: dict) -> DoRALinear:
    return DoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)


DORA = Method(
    name="dora",
    title="DoRA",
    summary="LoRA for the direction plus a trained magnitude per output row: closer to full fine-tuning, a bit slower.",
    paper="Liu et al. 2024, arXiv:2402.09353",
    hook="layer",
    build_layer=build_dora,
    defaults={"rank": 16, "dropout": 0.0, "lr": 2e-4, "lr_ratio": 1.0},  # alpha: 2 * rank
    peft_fields={"use_dora": True},
    saved_per_linear=lambda rank, d_out: rank + 2 * d_out,  # x·Aᵀ, plus the output and 1/‖W+BA‖ per row
)
