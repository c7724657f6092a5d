"""LoRA-FA — Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large
Language Models Fine-tuning", arXiv:2308.03303.

Same forward as LoRA, y = W0 x + b + s·B (A x), but A stays frozen at its random init
(kaiming-uniform, as LoRA's) and only B (d_out × r) is trained. The point is activation
memory: with z = A x (r numbers per token)

    ∂L/∂B = s · Σ_tokens (∂L/∂y) zᵀ        ∂L/∂x = s · (∂L/∂y) B A   (+ the base path's Wᵀ term)

so backward needs z, A and B but never x. LoRA saves x (d_in per token) for ∂L/∂A; here only
z is kept: by the one product of base and term (`lowrank.frozen_plus_term`, which saves z and
s·B; z = x Aᵀ with A frozen keeps only A), or on the module path by `_FrozenALoRA`. Dropout on
the adapter input would need x (or a mask of its size), so LoRA-FA runs without it, as in the
paper. Claimed: up to 1.4× less memory than LoRA at similar accuracy.

Optional (`--option projected_gradient=true`), as in peft's `create_lorafa_optimizer` (from
the paper's later revision): before AdamW, B's gradient is replaced by

    g_B ← (1/s²) · g_B (A Aᵀ)⁻¹

which makes the weight update s·g_B·A equal the full gradient projected on A's row space,
g·Aᵀ(AAᵀ)⁻¹A. (AAᵀ)⁻¹ is the pseudo-inverse of AAᵀ + 1e-8·I; A is frozen, so it could be
cached, but it is r×r and cheap.

Defaults: rank 16, alpha 32, lr 2e-4 (LoRA's), dropout 0 (required), projected_gradient false.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_studio.methods.base import AdjustedAdamW, Method, adamw, lora_pairs, trainable_parameters
from lora_studio.methods.lora import LoRALinear

RIDGE = 1e-8


class _FrozenALoRA(torch.autograd.Function):
    """s·B·(A x) that saves z = A x, never x, for backward (A gets no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        z = F.linear(x, lora_A)  # (..., r); bf16 under bf16 autocast, whatever x and A are
        ctx.save_for_backward(z, lora_A, lora_B)
        ctx.scaling = scaling
        ctx.x_dtype = x.dtype
        return F.linear(z, lora_B) * scaling  # (..., d_out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        # Backward runs outside autocast: do its products in the forward's compute dtype (z's),
        # as autocast would have, and hand each gradient back in its input's dtype (B's master
        # weights stay fp32 under bf16 autocast).
        compute = z.dtype
        grad_out = grad_out.to(compute)
        grad_x = grad_B = None
        if ctx.needs_input_grad[2]:
            # (d_out, N) @ (N, r) summed over every token
            grad_B = grad_out.reshape(-1, grad_out.shape[-1]).T @ z.reshape(-1, z.shape[-1]) * s
            grad_B = grad_B.to(lora_B.dtype)
        if ctx.needs_input_grad[0]:
            grad_z = F.linear(grad_out, lora_B.to(compute).T) * s  # (..., r)
            grad_x = F.linear(grad_z, lora_A.to(compute).T).to(ctx.x_dtype)  # (..., d_in)
        return grad_x, None, grad_B, None


class LoRAFALinear(LoRALinear):
    """LoRA with A frozen; the adapter path keeps r numbers per token for backward."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, use_rslora: bool = False) -> None:
        super().__init__(base, rank, alpha, dropout=0.0, use_rslora=use_rslora)
        self.lora_A.requires_grad_(False)

    def lora_term(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):  # autocast casts x itself (see LoRALinear)
            x = x.to(self.lora_B.dtype)
        return _FrozenALoRA.apply(x, self.lora_A, self.lora_B, self.scaling)


def build_lora_fa(base: nn.Module, cfg: Any, context: dict) -> LoRAFALinear:
    return LoRAFALinear(base, cfg.rank, cfg.alpha, cfg.use_rslora)


def check_lora_fa(cfg: Any) -> None:
    if cfg.dropout:
        raise ValueError(
            f"lora-fa runs without dropout (got dropout={cfg.dropout}): a dropout mask on the adapter "
            "input would keep an input-sized tensor for backward, the memory LoRA-FA exists to save; "
            "set dropout 0, or pick lora for dropout"
        )


def projected_b_gradient(grad_B: torch.Tensor, lora_A: torch.Tensor, scaling: float) -> torch.Tensor:
    """(1/s²) · g_B (A Aᵀ + δI)⁺: (d_out, r)."""
    eye = torch.eye(lora_A.shape[0], device=lora_A.device, dtype=torch.float64)
    aat_inv = torch.linalg.pinv(lora_A.double() @ lora_A.double().T + RIDGE * eye)  # (r, r)
    return (grad_B.double() @ aat_inv / scaling**2).to(grad_B.dtype)


class LoRAFAAdamW(AdjustedAdamW):
    """AdamW whose step first projects each B gradient onto A's row space (see module docstring)."""

    @torch.no_grad()
    def adjust_gradients(self) -> None:
        for lora_A, lora_B, scaling in self.pairs:
            if lora_B.grad is not None:
                lora_B.grad.copy_(projected_b_gradient(lora_B.grad, lora_A, scaling))


def build_lora_fa_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    params = list(trainable_parameters(model).values())
    if not LORA_FA.option(cfg, "projected_gradient"):
        return adamw(params, cfg)
    return adamw(params, cfg, LoRAFAAdamW, pairs=lora_pairs(model))


LORA_FA = Method(
    name="lora-fa",
    title="LoRA-FA",
    summary="LoRA with A frozen: half the trainable parameters and no copy of each layer's input kept for backward.",
    paper="Zhang et al. 2023, arXiv:2308.03303",
    hook="optimizer",
    build_layer=build_lora_fa,
    defaults={"rank": 16, "dropout": 0.0, "lr": 2e-4, "lr_ratio": 1.0, "projected_gradient": False},
    build_optimizer=build_lora_fa_optimizer,
    check=check_lora_fa,
    keeps_layer_input=False,
    fsdp_note=lambda cfg: (  # plain LoRA-FA (A frozen, AdamW on B) shards like LoRA
        "its projected B gradient (projected_gradient=True) needs the whole A of each layer ((A A^T)^-1), "
        "and FSDP2 holds only this rank's rows of A in the optimizer step"
        if LORA_FA.option(cfg, "projected_gradient") else None
    ),
)
