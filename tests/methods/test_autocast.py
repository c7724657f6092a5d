"""The parts of each method's own math that must stay in full precision under bf16 autocast.

Autocast runs the forward's products in bf16 (8-bit mantissa). That is fine for the products
LoRA adds to the activations, not for the methods' own bookkeeping:
  * DoRA divides its magnitude by ‖W0 + s·B A‖ per row: computed in fp32;
  * LoRA-Pro's solves (pseudo-inverses, a Sylvester equation) run in float64;
  * Delta-LoRA writes s·λ·ΔBA into W itself: W stays fp32 and the update is an fp32 product;
  * VeRA's shared random matrices and its trained scales stay fp32 (only the frozen base
    linears are stored in bf16).
"""

from __future__ import annotations

import torch
from torch import nn

from lora_studio.config import TrainConfig
from lora_studio.methods import adapter_layers
from lora_studio.methods.dora import DoRALinear
from lora_studio.methods.lora_pro import lora_pro_gradients
from lora_studio.methods.vera import shared_of
from lora_studio.engine.loop import prepare
from lora_studio.engine.plan import make_plan
from tests.helpers import adapted, perturb

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_dora_weight_norm_is_fp32_under_autocast():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(64, 32), rank=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    expected = torch.linalg.norm(layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    with torch.autocast(**BF16):
        norm = layer.weight_norm()
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)  # bf16 products would be off by ~2e-3


def test_lora_pro_solves_in_float64_even_inside_autocast():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 24, generator=gen), torch.randn(16, 4, generator=gen)
    ga, gb = torch.randn(4, 24, generator=gen), torch.randn(16, 4, generator=gen)
    outside = lora_pro_gradients(a, b, ga, gb, scaling=2.0)
    with torch.autocast(**BF16):
        inside = lora_pro_gradients(a, b, ga, gb, scaling=2.0)
    assert outside[2].dtype == torch.float64
    for x, y in zip(outside, inside):
        assert torch.equal(x, y)


def test_delta_lora_moves_an_fp32_base_with_an_fp32_product(tiny_llama_dir, train_file, tmp_path):
    cfg = TrainConfig(data=str(train_file), out=str(tmp_path), model=tiny_llama_dir, method="delta-lora",
                      precision="bf16", rank=4, max_steps=4).resolved()
    model = prepare(make_plan(cfg, "cpu"))["model"]
    layers = adapter_layers(model)
    assert all(layer.base.weight.dtype == torch.float32 for layer in layers.values())
    perturb(model)
    before = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
    with torch.autocast(**BF16):  # as if called inside the forward's context
        for layer in layers.values():
            layer.after_step(update=True)
    for name, layer in layers.items():
        delta = layer.lam * layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())  # B0 = 0
        torch.testing.assert_close(layer.base.weight.double(), before[name].double() + delta, rtol=0, atol=1e-6)


def test_vera_shared_matrices_and_scales_stay_fp32_when_the_base_is_bf16(tiny_llama_dir, train_file, tmp_path):
    cfg = TrainConfig(data=str(train_file), out=str(tmp_path), model=tiny_llama_dir, method="vera",
                      precision="bf16", max_steps=4).resolved()
    model = prepare(make_plan(cfg, "cpu"))["model"]
    layers = adapter_layers(model)
    assert any(layer.base.weight.dtype == torch.bfloat16 for layer in layers.values())  # the base did go to bf16
    shared = shared_of(model)
    assert shared.vera_A.dtype == shared.vera_B.dtype == torch.float32
    for layer in layers.values():
        assert layer.vera_lambda_b.dtype == layer.vera_lambda_d.dtype == torch.float32


def test_dora_trained_in_bf16_keeps_its_magnitude_fp32(tiny_llama_dir):
    model, _ = adapted(tiny_llama_dir, "dora")
    ids = torch.randint(3, 100, (2, 8))
    model.train()
    with torch.autocast(**BF16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for layer in adapter_layers(model).values():
        assert layer.lora_magnitude_vector.dtype == torch.float32
        assert layer.lora_magnitude_vector.grad.dtype == torch.float32
