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
from lora_studio.methods.lowrank import HALF, frozen_plus_term, product_dtype, rows_for_call, wide_weight


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class _LoRAProduct(torch.autograd.Function):
    """y = x W0ᵀ + b + (x Aᵀ)(s B)ᵀ in one compute dtype, with a hand-written backward.

    The same products as the module path (`lora_term` + `adapt`), fewer passes: x is cast once
    for W0 and A (autocast casts it for each) and backward forms d x = g W0 + (g s B) A in one
    buffer and casts it once. Where W0 has spare columns (`give_spare_columns`, which the engine
    sets up for bf16-stored weights), z = x Aᵀ sits beside x and s·B beside W0, so the frozen
    product adds the LoRA term and, backward, gives d z = g s B with d x: on the bench's short
    rows each small (r-wide) product costs a kernel call of 30–50 µs whatever its size. And the
    term is rounded once, with the base product: added to an output already rounded to bf16, a
    term below half its last digit (as B is, in the first steps) is lost, and training learned
    less (bench: eval loss 0.2849 against 0.2779 now, fp32 0.2771). Without spare columns a
    bf16/fp16 product lays [W0 | s·B] out for the call (W0 is cast or copied, +r columns); in
    fp32 or float64 the term is added inside the frozen product's buffer (addmm). Saved for
    backward: x in the compute dtype and z (r numbers per token), as autograd would. (The
    general form, for any term z cᵀ and without the fused d x: `lowrank.frozen_plus_term`.)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dtype, wide):  # type: ignore[override]
        # weight: W0 (d_out, d_in), or with `wide` the rows [W0 | s·B] (d_out, d_in + r) it is a
        # view of, their spare columns already written (`LoRALinear.write_spare_columns`).
        rank, d_in = lora_A.shape
        with torch.autocast(x.device.type, enabled=False):  # every dtype below is explicit
            x2 = x.reshape(-1, d_in)
            a = lora_A.to(dtype)  # (r, d_in)
            b = bias.to(dtype) if bias is not None else None
            if wide:
                xz = x2.new_empty(x2.shape[0], d_in + rank, dtype=dtype)  # (N, d_in + r) = [x | z]
                xz[:, :d_in] = x2
                xz[:, d_in:] = xz[:, :d_in] @ a.T
                y = xz @ weight.T if b is None else torch.addmm(b, xz, weight.T)  # (N, d_out)
                x2, z, sb = xz[:, :d_in], xz[:, d_in:], weight[:, d_in:]
            else:
                x2 = x2.to(dtype)  # (N, d_in)
                sb = (lora_B * scaling).to(dtype)  # (d_out, r)
                z = x2 @ a.T  # (N, r)
                if dtype in HALF:  # [W0 | s·B] for this call: one rounding
                    w = rows_for_call(weight, sb)  # (d_out, d_in + r)
                    xz = torch.cat([x2, z], 1)  # (N, d_in + r)
                    y = xz @ w.T if b is None else torch.addmm(b, xz, w.T)  # (N, d_out)
                else:
                    w = weight.to(dtype)  # (d_out, d_in)
                    y = x2 @ w.T if b is None else torch.addmm(b, x2, w.T)  # (N, d_out)
                    y.addmm_(z, sb.T)
        # (All through save_for_backward, which compiled code needs: the spare columns are
        # rewritten before this layer's next forward, after this backward.)
        ctx.save_for_backward(x2, z, a, sb, weight)
        ctx.wide = wide
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.dtypes = scaling, x.shape, x.dtype, (lora_A.dtype, lora_B.dtype)
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x2, z, a, sb, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(x2.dtype)  # (N, d_out)
        needs = ctx.needs_input_grad
        grad_x = grad_a = grad_b = None
        d_in = x2.shape[1]
        with torch.autocast(g.device.type, enabled=False):
            if needs[0] and ctx.wide:
                gxz = g @ weight  # (N, d_in + r) = [g W0 | g s B]
                gz = gxz[:, d_in:]  # (N, r): d loss / d z
                grad_x = gxz[:, :d_in].addmm_(gz, a)
            else:
                gz = g @ sb  # (N, r)
                if needs[0]:
                    grad_x = (g @ weight.to(x2.dtype)).addmm_(gz, a)
            if grad_x is not None:
                grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
            if needs[3]:
                grad_a = (gz.T @ x2).to(ctx.dtypes[0])  # (r, d_in)
            if needs[4]:
                grad_b = (g.T @ z).to(ctx.dtypes[1]).mul_(ctx.scaling)  # (d_out, r)
        return grad_x, None, None, grad_a, grad_b, None, None, None


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._product_dtype(x)
        if dtype is None:
            return super().forward(x)
        weight = self.base.weight
        rows = wide_weight(weight, self.rank) if weight.dtype == dtype else None  # (d_out, d_in + r)
        if rows is not None:
            self.write_spare_columns(rows)
        if not isinstance(self.dropout, nn.Identity) or not self.lora_A.requires_grad or type(self.base) is not nn.Linear:
            return self.product(x, dtype)  # dropout's mask, a frozen A, a 4-bit base
        weight = weight if rows is None else rows
        return _LoRAProduct.apply(x, weight, self.base.bias, self.lora_A, self.lora_B, self.scaling, dtype, rows is not None)

    def product(self, x: torch.Tensor, dtype: torch.dtype, bias: bool = True) -> torch.Tensor:
        """x W0ᵀ (+ b) + s·B A dropout(x) in one product (`lowrank.frozen_plus_term`), z and c
        through autograd: where `_LoRAProduct`'s fused backward does not fit (dropout's mask,
        a frozen A whose input need not be kept, DoRA's scale after the product, a 4-bit W0)."""
        z = F.linear(self.dropout(x.to(dtype)), self.lora_A.to(dtype))  # (..., r)
        return frozen_plus_term(self.base, x, z, self.lora_B * self.scaling, dtype, bias)

    @torch.no_grad()
    def write_spare_columns(self, rows: torch.Tensor | None = None) -> None:
        """This step's s·B into W0's spare columns (`give_spare_columns`), if it has them.
        Not in compiled code, where writing into an input would copy all of W0 back after each
        call: there `speed.compile_regions` calls this before the model body runs."""
        rows = wide_weight(self.base.weight, self.rank) if rows is None else rows
        if rows is not None and not torch.compiler.is_compiling():
            rows[:, self.in_features :] = self.lora_B * self.scaling

    def _product_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The compute dtype of the one-product path, or None for the module path (`adapt`): a
        disabled adapter, or a base the product cannot take (`lowrank.product_dtype`)."""
        if self.disabled:
            return None
        return product_dtype(self.base, x, self.lora_A, self.lora_B)

    @property
    def spare_columns(self) -> int:
        """Spare columns a row of W0's storage gives the one-product path (`give_spare_columns`)."""
        return self.rank

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
