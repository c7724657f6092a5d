"""VeRA — Kopiczko, Blankevoort & Asano 2023, "VeRA: Vector-based Random Matrix Adaptation", arXiv:2310.11454.

One pair of random matrices is shared, frozen, by every adapted layer; each layer trains two
scaling vectors only:

    y = W0 x + b + λ_b ⊙ (B[:d_out] (λ_d ⊙ (A[:, :d_in] x)))         (no α scaling)

A (r × max d_in) and B (max d_out × r) are sized to the largest adapted layer and sliced per
layer. They are drawn kaiming-uniform (bound √(6 / fan_in)) from `torch.Generator` seeded with
`projection_prng_key`, A first then B, in float32, exactly as peft draws them, so the seed
alone regrows them (they are still saved with the adapter, as peft does by default).
Trainable per layer: λ_d ∈ R^r (init d_initial = 0.1) and λ_b ∈ R^{d_out} (init 0, so the
adapted model equals the base at step 0): d_out + r numbers against LoRA's r(d_in + d_out).
Claimed: about 10× fewer trainable parameters than LoRA at similar quality.
Merge: W ← W0 + (λ_b ⊙ B)(λ_d ⊙ A). Export: peft's VERA format (`base_model.vera_A`,
`base_model.vera_B`, `<layer>.vera_lambda_b`, `<layer>.vera_lambda_d`).

Defaults: rank 256, lr 1e-2 (the paper trains its vectors at 10-100× LoRA's rate; at 2e-3
VeRA barely moved in one epoch: docs/methods_table.md), dropout 0, d_initial 0.1,
projection_prng_key 0, all linear layers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_studio.methods.base import (
    AdapterLayer,
    Method,
    adapter_layers,
    base_weight,
    inject_adapters,
    linear_shape,
    load_layer_states,
)
from lora_studio.methods.lowrank import frozen_plus_term, product_dtype, wide_weight

SHARED_KEYS = ("base_model.vera_A", "base_model.vera_B")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(±√(6 / fan_in)), fan_in = shape[1]: kaiming-uniform with gain √2, as peft's `_kaiming_init`."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAShared(nn.Module):
    """The frozen random pair. One instance is a child of every VeRA layer: `.to()` moves it
    once, it is never trained, and it is not in the model's state_dict (non-persistent)."""

    def __init__(self, rank: int, max_in: int, max_out: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", kaiming_uniform((rank, max_in), generator), persistent=False)  # (r, max_in)
        self.register_buffer("vera_B", kaiming_uniform((max_out, rank), generator), persistent=False)  # (max_out, r)


class VeRALinear(AdapterLayer):
    """A frozen linear plus λ_b ⊙ B (λ_d ⊙ A x) over slices of the shared pair."""

    def __init__(self, base: nn.Module, shared: VeRAShared, d_initial: float, dropout: float = 0.0) -> None:
        super().__init__(base)
        rank, max_in = shared.vera_A.shape
        if max_in < self.in_features or shared.vera_B.shape[0] < self.out_features:
            raise ValueError("the shared VeRA matrices are smaller than this layer")
        self.shared = shared
        device = shared.vera_A.device
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), float(d_initial), device=device))  # (r,)
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))  # (d_out,)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:, :d_in] (r, d_in) and B[:d_out] (d_out, r)."""
        return self.shared.vera_A[:, : self.in_features], self.shared.vera_B[: self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (not A, B: the frozen shared pair may stay fp32 where FSDP computes the layers in bf16)
        dtype = None if self.disabled else product_dtype(self.base, x, self.vera_lambda_d, self.vera_lambda_b)
        if dtype is None:
            return super().forward(x)
        a, b = self.sliced()
        # The term z cᵀ with z = λ_d ⊙ x Aᵀ, c = λ_b ⊙ B, rounded once with the base product
        # (`lowrank`): added to a bf16 output, λ_b's first small updates were lost.
        self.write_spare_columns()
        z = self.vera_lambda_d * F.linear(self.dropout(x.to(dtype)), a.to(dtype))  # (..., r)
        return frozen_plus_term(self.base, x, z, self.vera_lambda_b.unsqueeze(1) * b, dtype)

    @torch.no_grad()
    def write_spare_columns(self) -> None:
        """λ_b ⊙ B into W0's spare columns (`lowrank.give_spare_columns`), if it has them; not
        in compiled code (see `LoRALinear.write_spare_columns`)."""
        rows = wide_weight(self.base.weight, self.spare_columns)
        if rows is not None and not torch.compiler.is_compiling():
            rows[:, self.in_features :] = self.vera_lambda_b.unsqueeze(1) * self.sliced()[1]

    @property
    def spare_columns(self) -> int:
        """Spare columns a row of W0's storage gives the one-product path: the shared rank."""
        return self.shared.vera_A.shape[0]

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self.sliced()
        z = self.vera_lambda_d * F.linear(self.dropout(x.to(a.dtype)), a)  # (..., r)
        return y + (self.vera_lambda_b * F.linear(z, b)).to(y.dtype)  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        """(λ_b ⊙ B)(λ_d ⊙ A): (d_out, d_in)."""
        a, b = self.sliced()
        return (self.vera_lambda_b.unsqueeze(1) * b) @ (self.vera_lambda_d.unsqueeze(1) * a)

    def merged_weight(self) -> torch.Tensor:
        return base_weight(self.base).to(self.vera_lambda_b.dtype) + self.delta_weight()

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b.detach(), "vera_lambda_d": self.vera_lambda_d.detach()}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.vera_lambda_b.copy_(state["vera_lambda_b"])
            self.vera_lambda_d.copy_(state["vera_lambda_d"])


def new_vera_context(model: nn.Module, names: list[str], cfg: Any) -> dict:
    """The shared pair, sized to the largest adapted layer."""
    shapes = [linear_shape(model.get_submodule(n)) for n in names]
    max_in = max(d_in for d_in, _, _ in shapes)
    max_out = max(d_out for _, d_out, _ in shapes)
    shared = VeRAShared(cfg.rank, max_in, max_out, int(VERA.option(cfg, "projection_prng_key")))
    return {"shared": shared.to(next(model.get_submodule(names[0]).parameters()).device)}


def build_vera(base: nn.Module, cfg: Any, context: dict) -> VeRALinear:
    return VeRALinear(base, context["shared"], VERA.option(cfg, "d_initial"), cfg.dropout)


def shared_of(model: nn.Module) -> VeRAShared:
    return next(iter(adapter_layers(model).values())).shared


def export_vera_state(model: nn.Module, settings: dict) -> dict[str, torch.Tensor]:
    shared = shared_of(model)
    tensors = {SHARED_KEYS[0]: shared.vera_A, SHARED_KEYS[1]: shared.vera_B}
    for name, layer in adapter_layers(model).items():
        for key, value in layer.peft_state().items():
            tensors[f"base_model.model.{name}.{key}"] = value
    return tensors


def export_vera_config(model: nn.Module, settings: dict, config: dict) -> dict:
    """peft's VeraConfig fields (it has no lora_alpha / init_lora_weights)."""
    config = {k: v for k, v in config.items() if k != "init_lora_weights"}
    options = settings.get("method_options") or {}
    config.update(
        d_initial=options.get("d_initial", VERA.defaults["d_initial"]),
        init_weights=True,
        layers_pattern=None,
        projection_prng_key=options.get("projection_prng_key", VERA.defaults["projection_prng_key"]),
        save_projection=True,
        vera_dropout=settings.get("dropout") or 0.0,
    )
    return config


def import_vera_state(model: nn.Module, tensors: dict[str, torch.Tensor], cfg: Any, modules: list[str]) -> set[str]:
    """Inject VeRA (the pair regrown from the seed), then take the saved pair when the file has it."""
    inject_adapters(model, VERA, cfg)
    used = load_layer_states(model, tensors)
    shared = shared_of(model)
    if all(k in tensors for k in SHARED_KEYS):
        a, b = tensors[SHARED_KEYS[0]], tensors[SHARED_KEYS[1]]
        need_in = max(layer.in_features for layer in adapter_layers(model).values())
        need_out = max(layer.out_features for layer in adapter_layers(model).values())
        if a.shape[0] != b.shape[1] or a.shape[1] < need_in or b.shape[0] < need_out:
            raise ValueError(f"vera_A {tuple(a.shape)} / vera_B {tuple(b.shape)} do not fit the adapted layers")
        device = shared.vera_A.device
        shared.vera_A = a.to(device=device, dtype=torch.float32)
        shared.vera_B = b.to(device=device, dtype=torch.float32)
        used.update(SHARED_KEYS)
    return used


VERA = Method(
    name="vera",
    title="VeRA",
    summary="Shared frozen random matrices, two small trained vectors per layer: ~10x fewer trainable parameters than LoRA.",
    paper="Kopiczko et al. 2023, arXiv:2310.11454",
    hook="layer",
    build_layer=build_vera,
    defaults={
        "rank": 256,
        "alpha": 1.0,  # unused: VeRA has no alpha / r scale
        "dropout": 0.0,
        "lr": 1e-2,
        "lr_ratio": 1.0,
        "d_initial": 0.1,
        "projection_prng_key": 0,
    },
    peft_type="VERA",
    new_context=new_vera_context,
    export_state=export_vera_state,
    export_config=export_vera_config,
    import_state=import_vera_state,
    peft_settings=lambda config: {
        "rank": config["r"], "alpha": 1.0, "dropout": 0.0, "use_rslora": False,
        # Without saved projections, vera_A/vera_B are regrown from this seed.
        "method_options": {"projection_prng_key": config.get("projection_prng_key", 0)},
    },
    saved_per_linear=lambda rank, d_out: 2 * rank + d_out,  # x·Aᵀ, λ_d-scaled, and B·(...) before λ_b
)
