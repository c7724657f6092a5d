"""The one product of a frozen weight and a method's low-rank term (`lowrank.frozen_plus_term`)
against autograd through its equation, and every layer that takes it against its own module path
(`y + term`), in float64, with and without spare columns."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_studio.methods.lora as lora_module
import lora_studio.methods.vera as vera_module
from lora_studio.methods.delta_lora import DeltaLoRALinear
from lora_studio.methods.dora import DoRALinear
from lora_studio.methods.lora import LoRALinear
from lora_studio.methods.lora_fa import LoRAFALinear
from lora_studio.methods.lowrank import frozen_plus_term, give_spare_columns, wide_weight
from lora_studio.methods.vera import VeRALinear, VeRAShared


@pytest.mark.parametrize("spare", [False, True], ids=["addmm", "spare-columns"])
@pytest.mark.parametrize("bias", [True, False])
def test_frozen_plus_term_gives_the_equations_gradients(bias, spare):
    """y = x W0ᵀ + b + z cᵀ with z, c from autograd tensors of their own (z = x P, c = Q ⊙ 2):
    outputs and the gradients of x, P and Q equal autograd through the equation."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias).double().requires_grad_(False)
    p = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    if spare:
        give_spare_columns(base.weight, 3)
    x, g = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 10, dtype=torch.float64)
    runs = []
    for fused in (True, False):
        x_ = x.clone().requires_grad_(True)
        z, c = x_ @ p, q * 2  # (2, 5, 3), (10, 3)
        if fused:
            if spare:
                wide_weight(base.weight, 3)[:, 12:] = c.detach()
            y = frozen_plus_term(base, x_, z, c, torch.float64)
        else:
            y = x_ @ base.weight.T + z @ c.T + (base.bias if bias else 0)
        y.backward(g)
        runs.append([y.detach(), x_.grad, p.grad.clone(), q.grad.clone()])
        p.grad = q.grad = None
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _layers(kind: str = "linear") -> dict[str, nn.Module]:
    torch.manual_seed(0)

    def base() -> nn.Module:
        layer = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)  # GPT-2's, weight (d_in, d_out)
        if kind != "linear":
            nn.init.normal_(layer.bias, std=0.2)
        return layer.double().requires_grad_(False)

    layers = {
        "lora-dropout": LoRALinear(base(), rank=4, alpha=8.0, dropout=0.3),
        "lora-fa": LoRAFALinear(base(), rank=4, alpha=8.0),
        "dora": DoRALinear(base(), rank=4, alpha=8.0),
        "vera": VeRALinear(base(), VeRAShared(6, 12, 10, seed=0), d_initial=0.1, dropout=0.2),
        "delta-lora": DeltaLoRALinear(base(), rank=4, alpha=8.0, lam=2.0),  # (LoRA's fused function)
    }
    return {name: layer.double() for name, layer in layers.items()}


def _run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """Output and gradients (x, then every trainable tensor) for one call; dropout's mask seeded."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)
    y = layer(x)
    y.backward(g)
    out = [y.detach(), x.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("layout", ["plain", "spare-columns", "conv1d"])
@pytest.mark.parametrize("name", list(_layers()))
def test_each_layer_takes_one_product_equal_to_its_module_path(name, layout, monkeypatch):
    """The one-product path (base and term rounded once) computes what the module path
    (`AdapterLayer.adapt`: base output plus the term) computes, outputs and gradients, over two
    steps that change every trained tensor (a stale spare column would show); over nn.Linear,
    with and without spare columns, and over GPT-2's Conv1D."""
    spare = layout == "spare-columns"
    layer = _layers("conv1d" if layout == "conv1d" else "linear")[name].train()
    if spare:
        give_spare_columns(layer.base.weight, layer.spare_columns)
    x, g = torch.randn(3, 5, 12, dtype=torch.float64), torch.randn(3, 5, 10, dtype=torch.float64)
    calls = []
    for module, name in ((lora_module, "frozen_plus_term"), (vera_module, "frozen_plus_term"), (lora_module._LoRAProduct, "apply")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    for _ in range(2):
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)  # an optimizer step
        fused = _run(layer, x, g)
        assert calls, "the one-product path did not run"
        with monkeypatch.context() as patch:
            patch.setattr(lora_module, "product_dtype", lambda *a: None)
            patch.setattr(vera_module, "product_dtype", lambda *a: None)
            reference = _run(layer, x, g)
        assert len(fused) == len(reference) >= 3
        for got, want in zip(fused, reference):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        calls.clear()
    if spare:
        assert wide_weight(layer.base.weight, layer.spare_columns) is not None


def test_dora_with_dropout_in_training_keeps_the_module_path(monkeypatch):
    """peft's DoRA recomputes W0 on the dropped-out input there: not the one product."""
    layer = DoRALinear(nn.Linear(12, 10).requires_grad_(False), rank=4, alpha=8.0, dropout=0.2).train()
    monkeypatch.setattr(lora_module, "frozen_plus_term", lambda *a, **k: pytest.fail("one product taken"))
    assert layer(torch.randn(2, 12)).shape == (2, 10)


def test_vera_in_bf16_takes_the_one_product_over_an_fp32_shared_pair(monkeypatch):
    """Where FSDP computes a layer in bf16 without autocast, VeRA's frozen random pair stays fp32
    (a buffer): the pair is cast for the call, and base and term are still rounded once."""
    layer = VeRALinear(nn.Linear(12, 10).requires_grad_(False), VeRAShared(6, 12, 10, seed=0), d_initial=0.1)
    layer.base.to(torch.bfloat16)
    layer.vera_lambda_d.data, layer.vera_lambda_b.data = layer.vera_lambda_d.data.bfloat16(), layer.vera_lambda_b.data.bfloat16()
    assert layer.shared.vera_A.dtype == torch.float32
    calls = []
    real = vera_module.frozen_plus_term
    monkeypatch.setattr(vera_module, "frozen_plus_term", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    y = layer(torch.randn(3, 12, dtype=torch.bfloat16))
    assert calls == [torch.bfloat16] and y.dtype == torch.bfloat16
