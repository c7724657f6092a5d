"""LoRA against its equation, against hand-computed merges, and against peft's layer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_studio.methods.lora import LoRALinear, lora_scaling
from lora_studio.methods.lowrank import give_spare_columns, wide_weight


def _layer(kind: str, d_in: int = 12, d_out: int = 10) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    layer = Conv1D(d_out, d_in)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def _w0(layer: nn.Module) -> torch.Tensor:  # (d_out, d_in)
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_the_equation(kind, rslora):
    base = _layer(kind)
    lora = LoRALinear(base, rank=4, alpha=8.0, use_rslora=rslora)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 5, 12)
    s = 8.0 / math.sqrt(4) if rslora else 8.0 / 4
    expected = x @ _w0(base).T + base.bias + s * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(lora(x), expected)


def test_init_bounds_and_zero_b():
    lora = LoRALinear(_layer("linear", d_in=64), rank=8, alpha=16)
    assert torch.count_nonzero(lora.lora_B) == 0
    assert lora.lora_A.abs().max() <= 1 / math.sqrt(64)
    assert lora.lora_A.std() > 0.5 / math.sqrt(64) / math.sqrt(3)  # uniform, not collapsed
    assert lora_scaling(16, 8) == 2.0 and lora_scaling(16, 4, use_rslora=True) == 8.0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_is_w0_plus_sba(kind):
    base = _layer(kind)
    w0 = _w0(base).detach().clone()
    lora = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    merged = lora.merged_layer()
    torch.testing.assert_close(_w0(merged), w0 + 2.0 * lora.lora_B @ lora.lora_A)
    assert type(merged) is type(base)
    x = torch.randn(4, 12)
    torch.testing.assert_close(merged(x), lora(x))


def test_dropout_only_on_the_adapter_path():
    lora = LoRALinear(_layer("linear"), rank=4, alpha=8.0, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(64, 12)
    lora.train()
    torch.manual_seed(0)
    noisy = lora(x)
    lora.eval()
    clean = lora(x)
    assert not torch.allclose(noisy, clean)
    lora.disabled = True
    lora.train()
    torch.testing.assert_close(lora(x), lora.base(x))


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_peft_lora_layer(rslora):
    peft = pytest.importorskip("peft")
    ours = LoRALinear(_layer("linear"), rank=4, alpha=8.0, use_rslora=rslora)
    with torch.no_grad():
        ours.lora_B.normal_()
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=["lin"])
    ref = peft.inject_adapter_in_model(config, _Holder(_layer("linear")))
    with torch.no_grad():
        ref.lin.lora_A["default"].weight.copy_(ours.lora_A)
        ref.lin.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(ours(x), ref.lin(x))


class _Holder(nn.Module):
    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin


def _grads(lora: LoRALinear, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = lora(x)
    y.backward(g)
    grads = [x.grad, lora.lora_A.grad, lora.lora_B.grad]
    lora.zero_grad(set_to_none=True)
    return [y.detach(), *grads]


def _module_path(lora: LoRALinear, monkeypatch) -> None:
    monkeypatch.setattr(LoRALinear, "_product_dtype", lambda self, x: None)


@pytest.mark.parametrize("spare", [False, True], ids=["addmm", "spare-columns"])
@pytest.mark.parametrize("bias", [True, False])
def test_one_function_path_gives_the_equations_gradients(bias, spare, monkeypatch):
    """`_LoRAProduct`'s hand-written backward against autograd through the equation, in float64:
    d x = g W0 + s (g B) A, d A = s (g B)ᵀ x, d B = s gᵀ (x Aᵀ); both layouts of W0 (plain, and
    with spare columns holding s·B), over two steps so that a stale s·B would show."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias).double().requires_grad_(False)  # frozen, as inject_adapters leaves it
    lora = LoRALinear(base, rank=4, alpha=12.0).double()
    if spare:
        give_spare_columns(base.weight, lora.spare_columns)
    assert (wide_weight(base.weight, 4) is not None) == spare
    x, g = torch.randn(3, 5, 12, dtype=torch.float64), torch.randn(3, 5, 10, dtype=torch.float64)
    assert lora._product_dtype(x) == torch.float64  # the one-function path runs
    for _ in range(2):
        with torch.no_grad():
            lora.lora_B.normal_()  # an optimizer step
        with monkeypatch.context() as patch:
            fused = _grads(lora, x, g)
            _module_path(lora, patch)
            reference = _grads(lora, x, g)
        for got, want in zip(fused, reference):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert fused[1].abs().sum() > 0 and fused[2].abs().sum() > 0
    if spare:  # the spare columns hold this step's s·B, W0 is untouched
        torch.testing.assert_close(wide_weight(base.weight, 4)[:, 12:], lora.lora_B * lora.scaling)


def test_spare_columns_with_a_frozen_input_still_give_the_adapter_gradients():
    """The first layer's input needs no gradient: d z then comes from its own small product."""
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(12, 10).double().requires_grad_(False), rank=4, alpha=8.0).double()
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(6, 12, dtype=torch.float64)
    lora(x).square().sum().backward()
    want = [lora.lora_A.grad.clone(), lora.lora_B.grad.clone()]
    lora.zero_grad(set_to_none=True)
    give_spare_columns(lora.base.weight, 4)
    assert wide_weight(lora.base.weight, 4) is not None
    lora(x).square().sum().backward()
    for got, ref in zip([lora.lora_A.grad, lora.lora_B.grad], want):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # A weight replaced later (moved, re-cast) loses the layout: the plain path, never stale columns.
    lora.base.weight.data = lora.base.weight.data.contiguous()
    assert wide_weight(lora.base.weight, 4) is None and wide_weight(torch.zeros(10, 16)[:, :12], 4) is None


@pytest.mark.parametrize("stored", ["fp32", "bf16-spare-columns"])
def test_one_function_path_under_bf16_autocast_matches_the_module_path(stored, monkeypatch):
    """Under bf16 autocast: bf16 output, fp32 gradients for the fp32 input and adapter, within
    bf16 rounding of what autocast gives the module path (which rounds the term separately).
    `bf16-spare-columns`: W0 as the engine stores it on a bf16 CPU (`store_frozen_linears`)."""
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(64, 48).requires_grad_(False), rank=8, alpha=16.0)
    if stored != "fp32":
        give_spare_columns(lora.base.weight, 8, torch.bfloat16)
        assert wide_weight(lora.base.weight, 8) is not None
    with torch.no_grad():
        lora.lora_B.normal_(std=0.1)
    x, g = torch.randn(2, 7, 64), torch.randn(2, 7, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora._product_dtype(x) == torch.bfloat16
        fused = _grads(lora, x, g)
        _module_path(lora, monkeypatch)
        reference = _grads(lora, x, g)
    y, grad_x, grad_a, grad_b = fused
    assert y.dtype == torch.bfloat16 and grad_x.dtype == grad_a.dtype == grad_b.dtype == torch.float32
    for got, want in zip(fused, reference):
        assert got.dtype == want.dtype
        assert ((got.float() - want.float()).norm() / want.float().norm()) < 2e-2


def test_one_function_path_is_skipped_where_it_would_change_the_method():
    plain = LoRALinear(nn.Linear(12, 10).requires_grad_(False), rank=4, alpha=8.0)
    assert plain._product_dtype(torch.randn(2, 12)) == torch.float32
    plain.base.bias.requires_grad_(True)
    assert plain._product_dtype(torch.randn(2, 12)) is None  # a trainable base needs its gradient
    plain.base.bias.requires_grad_(False)
    assert plain._product_dtype(torch.randn(2, 12).double()) is None  # mixed dtypes outside autocast
    plain.disabled = True
    assert plain._product_dtype(torch.randn(2, 12)) is None
    assert LoRALinear(Conv1D(10, 12), rank=4, alpha=8.0)._product_dtype(torch.randn(2, 12)) is None


@pytest.mark.parametrize("stored", ["fp32", "bf16-spare-columns"])
def test_compiled_layer_trains_as_the_eager_one(stored):
    """`torch.compile` (as `compile: auto` applies it: dynamic shapes) traces the one-function
    path: over steps that change B, outputs and adapter gradients equal the eager layer's under
    bf16 autocast. With spare columns, compiled code reads s·B there and leaves writing it to
    eager code before the call (`write_spare_columns`, which `compile_regions` hooks in)."""
    def make():
        torch.manual_seed(0)
        lora = LoRALinear(nn.Linear(32, 24).requires_grad_(False), rank=4, alpha=8.0)
        if stored != "fp32":
            give_spare_columns(lora.base.weight, 4, torch.bfloat16)
        return lora

    x = torch.randn(2, 5, 32)
    runs = []
    for compiled in (False, True):
        lora = make()
        layer = torch.compile(lora, dynamic=True) if compiled else lora
        steps = []
        for _ in range(3):
            with torch.no_grad():
                lora.lora_B.add_(0.1)  # an optimizer step
            if compiled:
                lora.write_spare_columns()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            y.float().square().sum().backward()
            steps.append([y.detach().float(), lora.lora_A.grad.clone(), lora.lora_B.grad.clone()])
            lora.zero_grad(set_to_none=True)
        runs.append(steps)
    for eager, compiled in zip(*runs):
        assert eager[1].abs().sum() > 0
        for want, got in zip(eager, compiled):
            torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)
