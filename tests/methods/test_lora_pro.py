"""LoRA-Pro: the equivalent gradient against its closed form from a known full gradient g,
X against the Sylvester equation, and the optimizer's wiring in a model."""

from __future__ import annotations

import pytest
import torch

from lora_studio.methods import adapter_layers, get_method
from lora_studio.methods.lora_pro import LoRAProAdamW, lora_pro_gradients, solve_sylvester_sym
from tests.helpers import adapted, sample_ids

D_OUT, D_IN, R, S = 24, 20, 4, 2.0


def _setup(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(R, D_IN, generator=gen, dtype=torch.float64) / D_IN**0.5
    b = torch.randn(D_OUT, R, generator=gen, dtype=torch.float64) * 0.1
    g = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)  # the full gradient dL/dW
    return a, b, g, S * b.T @ g, S * g @ a.T  # A, B, g, g_A = s Bᵀ g, g_B = s g Aᵀ


def _projections(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p_b = b @ torch.linalg.inv(b.T @ b) @ b.T  # (d_out, d_out)
    p_a = a.T @ torch.linalg.inv(a @ a.T) @ a  # (d_in, d_in)
    return p_a, p_b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivalent_gradient_is_the_closed_form(seed):
    a, b, g, g_a, g_b = _setup(seed)
    new_a, new_b, _ = lora_pro_gradients(a, b, g_a, g_b, S)
    g_tilde = S * b @ new_a + S * new_b @ a
    p_a, p_b = _projections(a, b)
    expected = p_b @ g + g @ p_a - p_b @ g @ p_a
    # the 1e-8 ridge on the r×r inverses leaves ~1e-7 here; a wrong formula is off by O(1)
    torch.testing.assert_close(g_tilde, expected, rtol=1e-6, atol=1e-6)
    # ... and it is closer to g than plain LoRA's equivalent gradient
    plain = S * b @ g_a + S * g_b @ a
    assert torch.linalg.norm(g_tilde - g) < torch.linalg.norm(plain - g)


@pytest.mark.parametrize("seed", [0, 1])
def test_x_solves_the_sylvester_equation(seed):
    a, b, g, g_a, g_b = _setup(seed)
    _, _, x = lora_pro_gradients(a, b, g_a, g_b, S)
    btb, aat = b.T @ b, a @ a.T
    rhs = -(torch.linalg.inv(btb) @ g_a @ a.T) / S**2
    torch.testing.assert_close(btb @ x + x @ aat, rhs, rtol=1e-6, atol=1e-8)
    assert x.abs().max() > 0


def test_sylvester_solver_on_a_random_system():
    gen = torch.Generator().manual_seed(3)
    m1 = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    m2 = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    p, q = m1 @ m1.T, m2 @ m2.T
    c = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    x = solve_sylvester_sym(p, q, c)
    torch.testing.assert_close(p @ x + x @ q, c)


def test_step_zero_with_b_zero():
    a, _, g, _, _ = _setup()
    b = torch.zeros(D_OUT, R, dtype=torch.float64)
    g_a, g_b = S * b.T @ g, S * g @ a.T
    new_a, new_b, x = lora_pro_gradients(a, b, g_a, g_b, S)
    assert torch.equal(new_a, g_a) and torch.equal(x, torch.zeros_like(x))
    torch.testing.assert_close(new_b, g_b @ torch.linalg.inv(a @ a.T) / S**2)
    # the equivalent gradient is then g projected on A's row space
    p_a = a.T @ torch.linalg.inv(a @ a.T) @ a
    torch.testing.assert_close(S * new_b @ a, g @ p_a)


def test_optimizer_rewrites_gradients_before_adamw(tiny_llama_dir):
    model, cfg = adapted(tiny_llama_dir, "lora-pro")
    with torch.no_grad():  # B != 0, as after a few steps
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(std=0.05)
    optimizer = get_method(cfg.method).make_optimizer(model, cfg)
    assert isinstance(optimizer, LoRAProAdamW) and len(optimizer.pairs) == len(adapter_layers(model))
    model.train()
    ids = sample_ids(model.config.vocab_size, batch=2, length=12)
    model(input_ids=ids, labels=ids).loss.backward()
    layers = list(adapter_layers(model).values())
    plain = [(layer.lora_A.grad.clone(), layer.lora_B.grad.clone()) for layer in layers]
    expected = [
        lora_pro_gradients(layer.lora_A, layer.lora_B, ga, gb, layer.scaling)[:2]
        for layer, (ga, gb) in zip(layers, plain)
    ]
    before = [(layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for layer in layers]
    optimizer.step()
    for layer, (ga, gb), (old_a, old_b) in zip(layers, expected, before):
        torch.testing.assert_close(layer.lora_A.grad, ga)
        torch.testing.assert_close(layer.lora_B.grad, gb)
        # AdamW's first step moves each entry by lr against the sign of the adjusted gradient
        step_a = old_a - layer.lora_A.detach()
        nonzero = ga.abs() > 1e-3 * ga.abs().max()
        torch.testing.assert_close(step_a[nonzero], cfg.lr * torch.sign(ga[nonzero]), rtol=1e-3, atol=1e-9)
    assert any(not torch.allclose(layer.lora_A.grad, ga) for layer, (ga, _) in zip(layers, plain))
