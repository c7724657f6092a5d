"""The frozen product and a method's low-rank term, rounded once:

    y = x W0ᵀ + b + z cᵀ = [x | z] [W0 | c]ᵀ + b        x (N, d_in), z (N, r), c (d_out, r)

Every layer method here adds a term of that shape: LoRA z = dropout(x) Aᵀ, c = s·B; LoRA-FA the
same with A frozen; VeRA z = λ_d ⊙ x Aᵀ, c = λ_b ⊙ B; DoRA LoRA's, before its row scale. Added
to a base output already rounded to bf16 (`y + term`, as peft does under autocast), a term below
half that output's last digit is lost entirely, and in the first steps all of a method's updates
are that small: training learns less. One product rounds base and term together.

Where the engine stored W0 in bf16 for one process (`give_spare_columns`), its rows carry r spare
columns for c, written before each forward, so the product costs no copy; elsewhere a bf16/fp16
product lays [W0 | c] out for the call (W0 is cast or copied there anyway; a bitsandbytes 4-bit
W0 is dequantized into it, and again in backward, never kept), and fp32/float64 add the term
inside the frozen product's buffer. z and c stay autograd tensors of the method's own
code: this function gives them d z = g c and d c = gᵀ z, and x its frozen path g W0.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_studio.methods.base import Conv1D, dense_weight, is_4bit

HALF = (torch.bfloat16, torch.float16)


def wide_weight(weight: torch.Tensor, rank: int) -> torch.Tensor | None:
    """The (d_out, d_in + r) rows [W0 | c] whose first d_in columns are `weight`, where
    `give_spare_columns` laid it out so; else None."""
    rows = getattr(weight, "spare_rows", None)
    d_out, d_in = weight.shape
    # The layout as well as the mark: a later `weight.data = ...` keeps the mark, not the layout.
    if rows is None or rows.shape != (d_out, d_in + rank) or weight.stride() != (d_in + rank, 1):
        return None
    if not torch.compiler.is_compiling() and rows.data_ptr() != weight.data_ptr():
        return None
    return rows


def give_spare_columns(weight: nn.Parameter, rank: int, dtype: torch.dtype | None = None) -> None:
    """Copy `weight` (d_out, d_in) into rows of d_in + r numbers (in `dtype`) and make it the
    (d_out, d_in) view of them: the adapter writes its c into the r spare columns and base and
    term run as one product, x W0ᵀ + z cᵀ = [x | z] [W0 | c]ᵀ."""
    d_out, d_in = weight.shape
    rows = weight.new_empty(d_out, d_in + rank, dtype=dtype or weight.dtype)
    rows[:, :d_in] = weight.data
    weight.data = rows[:, :d_in]
    weight.spare_rows = rows


def rows_for_call(w0: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[W0 | c] (d_out, d_in + r) in c's dtype, laid out for one call where W0 has no spare
    columns (W0 is cast, copied or dequantized here anyway)."""
    rows = c.new_empty(w0.shape[0], w0.shape[1] + c.shape[1])  # (d_out, d_in + r)
    rows[:, : w0.shape[1]], rows[:, w0.shape[1] :] = w0, c
    return rows


def product_dtype(base: nn.Module, x: torch.Tensor, *adapter: torch.Tensor) -> torch.dtype | None:
    """The compute dtype of a one-product layer over `base`, or None where it cannot take that
    path: a base that is not a plain float nn.Linear, GPT-2's Conv1D or a bitsandbytes 4-bit
    linear (nor a 4-bit weight repacked for bitsandbytes' bf16 CPU kernel), one with trainable
    tensors (this backward gives them no gradient), or mixed dtypes outside autocast."""
    weight = getattr(base, "weight", None)
    four_bit = weight is not None and is_4bit(weight) and type(base).__name__ == "Linear4bit"
    if four_bit:
        state = weight.quant_state
        if state is None or getattr(state, "packing_format_for_cpu", False):
            return None
        dense = base.compute_dtype or state.dtype
    elif (type(base) is nn.Linear or isinstance(base, Conv1D)) and weight is not None and weight.is_floating_point():
        dense = weight.dtype
    else:
        return None
    if any(p.requires_grad for p in base.parameters()):
        return None
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast and four_bit:  # bitsandbytes computes in its compute dtype whatever autocast says
        return dense  # (fp32 on a CPU: the term then adds to an fp32 product, as on the module path)
    if autocast:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if dense == x.dtype and all(t.dtype == x.dtype for t in adapter) else None


def frozen_plus_term(base: nn.Module, x: torch.Tensor, z: torch.Tensor, c: torch.Tensor, dtype: torch.dtype,
                     bias: bool = True) -> torch.Tensor:
    """x W0ᵀ (+ b) + z cᵀ in `dtype`, rounded once: x (..., d_in), z (..., r), c (d_out, r) ->
    (..., d_out). W0's spare columns, if it has them, must hold c already (the layer's
    `write_spare_columns`, or the compiled model's hook). A bitsandbytes 4-bit W0 is dequantized
    for the call, as bitsandbytes does itself (`product_dtype` sent a 4-bit layer without its
    quant state to the module path, where bitsandbytes restores it)."""
    weight = base.weight.T if isinstance(base, Conv1D) else base.weight  # (d_out, d_in); GPT-2 stores Wᵀ
    rows = wide_weight(weight, c.shape[1]) if weight.dtype == dtype else None  # (never 4-bit)
    weight = weight if rows is None else rows
    return _FrozenPlusTerm.apply(x, weight, base.bias if bias else None, z, c, dtype, rows is not None)


class _FrozenPlusTerm(torch.autograd.Function):
    """y = x W0ᵀ + b + z cᵀ in one compute dtype; saves z and c (r numbers per token), not x."""

    @staticmethod
    def forward(ctx, x, weight, bias, z, c, dtype, wide):  # type: ignore[override]
        # weight: W0 (d_out, d_in), or with `wide` the rows [W0 | c] (d_out, d_in + r) it is a
        # view of, their spare columns already written.
        d_in, rank = x.shape[-1], z.shape[-1]
        with torch.autocast(x.device.type, enabled=False):  # every dtype below is explicit
            x2, z2 = x.reshape(-1, d_in), z.reshape(-1, rank).to(dtype)  # (N, d_in), (N, r)
            b = bias.to(dtype) if bias is not None else None
            c2 = c.to(dtype)  # (d_out, r)
            if wide or dtype in HALF:
                # (d_out, d_in + r); a 4-bit W0 is dequantized for the call, and again in backward
                w = weight if wide else rows_for_call(dense_weight(weight), c2)
                xz = x2.new_empty(x2.shape[0], d_in + rank, dtype=dtype)  # (N, d_in + r) = [x | z]
                xz[:, :d_in], xz[:, d_in:] = x2, z2
                y = xz @ w.T if b is None else torch.addmm(b, xz, w.T)  # (N, d_out)
            else:
                x2, w = x2.to(dtype), dense_weight(weight).to(dtype)
                y = x2 @ w.T if b is None else torch.addmm(b, x2, w.T)  # (N, d_out)
                y.addmm_(z2, c2.T)
        # A 4-bit W0 is kept as it is (a parameter), never its dequantized copy: QLoRA's memory.
        ctx.save_for_backward(z2, c2, None if is_4bit(weight) else weight)
        ctx.quantized = weight if is_4bit(weight) else None
        ctx.wide = wide
        ctx.x_shape, ctx.x_dtype, ctx.z_shape, ctx.z_dtype, ctx.c_dtype = x.shape, x.dtype, z.shape, z.dtype, c.dtype
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        z2, c2, weight = ctx.saved_tensors
        weight = weight if ctx.quantized is None else dense_weight(ctx.quantized)
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(z2.dtype)  # (N, d_out)
        needs = ctx.needs_input_grad
        grad_x = grad_z = grad_c = None
        d_in = ctx.x_shape[-1]
        with torch.autocast(g.device.type, enabled=False):
            if ctx.wide and needs[0]:
                gxz = g @ weight  # (N, d_in + r) = [g W0 | g c]
                grad_x, grad_z = gxz[:, :d_in], gxz[:, d_in:]
            else:
                if needs[0]:
                    grad_x = g @ weight.to(g.dtype)  # (N, d_in)
                if needs[3]:
                    grad_z = g @ c2  # (N, r)
            if needs[4]:
                grad_c = (g.T @ z2).to(ctx.c_dtype)  # (d_out, r)
            if grad_x is not None:
                grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
            if grad_z is not None and needs[3]:
                grad_z = grad_z.to(ctx.z_dtype).reshape(ctx.z_shape)
            else:
                grad_z = None
        return grad_x, None, None, grad_z, grad_c, None, None
