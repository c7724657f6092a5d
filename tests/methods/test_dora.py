"""DoRA against its equation, its detached norm, its merge, and peft's DoRA layer and files."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_studio.methods.dora import DoRALinear


def _base(kind: str, d_in: int = 12, d_out: int = 10) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(d_in, d_out)
    else:
        layer = Conv1D(d_out, d_in)
        nn.init.normal_(layer.weight, std=0.3)
        nn.init.normal_(layer.bias, std=0.3)
    return layer.requires_grad_(False)


def _w0(layer: nn.Module) -> torch.Tensor:
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def _dora(kind: str, **kw) -> DoRALinear:
    layer = DoRALinear(_base(kind), rank=3, alpha=6.0, **kw)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, layer.out_features))
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_magnitude_starts_at_row_norms(kind):
    layer = DoRALinear(_base(kind), rank=3, alpha=6.0)
    torch.testing.assert_close(layer.lora_magnitude_vector, _w0(layer.base).norm(dim=1))
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), layer.base(x))  # B = 0: the base


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_merge_are_the_equation(kind):
    layer = _dora(kind)
    w0 = _w0(layer.base)
    v = w0 + 2.0 * layer.lora_B @ layer.lora_A  # s = 6 / 3
    w_prime = layer.lora_magnitude_vector.unsqueeze(1) * v / v.norm(dim=1, keepdim=True)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(layer(x), x @ w_prime.T + layer.base.bias)
    merged = layer.merged_layer()
    assert type(merged) is type(layer.base)
    torch.testing.assert_close(_w0(merged), w_prime)
    torch.testing.assert_close(merged(x), layer(x))


def test_norm_is_detached_in_backward():
    """Gradients equal those of the formula with ‖V‖ a constant (paper §4.3), and differ from
    the ones with ‖V‖ in the graph."""
    layer = _dora("linear")
    x = torch.randn(6, 12)
    weights = torch.randn(6, 10)
    (layer(x) * weights).sum().backward()

    def reference(detach: bool) -> list[torch.Tensor]:
        a = layer.lora_A.detach().clone().requires_grad_(True)
        b = layer.lora_B.detach().clone().requires_grad_(True)
        m = layer.lora_magnitude_vector.detach().clone().requires_grad_(True)
        v = layer.base.weight + 2.0 * b @ a
        norm = v.norm(dim=1, keepdim=True)
        w = m.unsqueeze(1) * v / (norm.detach() if detach else norm)
        ((x @ w.T + layer.base.bias) * weights).sum().backward()
        return [a.grad, b.grad, m.grad]

    ours = [layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude_vector.grad]
    for got, want in zip(ours, reference(detach=True)):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(ours[1], reference(detach=False)[1])


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("training", [False, True])
def test_forward_equals_peft_dora_layer(kind, training):
    peft = pytest.importorskip("peft")
    ours = _dora(kind, dropout=0.3)
    config = peft.LoraConfig(
        r=3, lora_alpha=6, use_dora=True, lora_dropout=0.3, target_modules=["lin"], fan_in_fan_out=kind == "conv1d"
    )
    ref = peft.inject_adapter_in_model(config, _Holder(_base(kind))).lin
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(ours.lora_A)
        ref.lora_B["default"].weight.copy_(ours.lora_B)
        ref.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    ours.train(training)
    ref.train(training)
    x = torch.randn(2, 7, 12)
    torch.manual_seed(5)  # the same dropout mask: both draw one mask over x
    got = ours(x)
    torch.manual_seed(5)
    torch.testing.assert_close(got, ref(x))
    if training:  # the dropout path really ran
        assert not torch.allclose(got, ours.eval()(x))


class _Holder(nn.Module):
    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin
