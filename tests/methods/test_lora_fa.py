"""LoRA-FA: A frozen, gradients against autograd's, saved activations against LoRA's, and the
optimizer against peft's `create_lorafa_optimizer`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_studio.methods import adapter_layers, get_method
from lora_studio.methods.lora import LoRALinear
from lora_studio.methods.lora_fa import LoRAFALinear, projected_b_gradient
from tests.helpers import adapted, sample_ids


def _pair(d_in: int = 48, d_out: int = 40, rank: int = 4) -> tuple[LoRALinear, LoRAFALinear]:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).requires_grad_(False)  # frozen, as inject_adapters leaves it
    torch.manual_seed(1)
    lora = LoRALinear(base, rank, alpha=8.0)
    torch.manual_seed(1)
    fa = LoRAFALinear(base, rank, alpha=8.0)
    with torch.no_grad():
        lora.lora_B.normal_()
        fa.lora_B.copy_(lora.lora_B)
    assert torch.equal(lora.lora_A, fa.lora_A)
    return lora, fa


def test_a_is_frozen_and_gradients_match_autograd():
    lora, fa = _pair()
    assert not fa.lora_A.requires_grad and fa.lora_B.requires_grad
    x = torch.randn(3, 7, 48)
    x_ref = x.clone().requires_grad_(True)
    x_fa = x.clone().requires_grad_(True)
    weights = torch.randn(3, 7, 40)
    (lora(x_ref) * weights).sum().backward()
    (fa(x_fa) * weights).sum().backward()
    torch.testing.assert_close(fa(x), lora(x))
    torch.testing.assert_close(fa.lora_B.grad, lora.lora_B.grad)
    torch.testing.assert_close(x_fa.grad, x_ref.grad)
    assert fa.lora_A.grad is None


def _saved_activation_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward, parameters and buffers left out."""
    params = {t.data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return sum(seen.values())


def test_saves_only_a_x_for_backward():
    """Per token, backward keeps z = A x (r numbers) and not x: measured as what 32 more tokens
    add to the saved bytes (besides them: s·B, d_out × r, whatever the tokens)."""
    lora, fa = _pair(d_in=256, d_out=64, rank=4)
    # as inside a network: the input needs a gradient
    x, longer = torch.randn(2, 32, 256, requires_grad=True), torch.randn(2, 48, 256, requires_grad=True)
    lora_bytes = _saved_activation_bytes(lora, longer) - _saved_activation_bytes(lora, x)
    fa_bytes = _saved_activation_bytes(fa, longer) - _saved_activation_bytes(fa, x)
    tokens, r, d_in = 2 * 16, 4, 256
    assert fa_bytes == tokens * r * 4  # z = A x only (float32)
    assert lora_bytes >= tokens * (d_in + r) * 4  # x and z
    assert _saved_activation_bytes(fa, x) <= 2 * 32 * r * 4 + 64 * r * 4


def test_dropout_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="lora-fa runs without dropout"):
        adapted(tiny_llama_dir, "lora-fa", dropout=0.1)


def test_projected_gradient_is_the_projection_on_a():
    """s · g^B · A = g Aᵀ(AAᵀ)⁻¹A for a known full gradient g (with g_B = s·g·Aᵀ)."""
    torch.manual_seed(0)
    a = torch.randn(4, 20, dtype=torch.float64)
    g = torch.randn(12, 20, dtype=torch.float64)
    s = 2.0
    g_b = s * g @ a.T
    new = projected_b_gradient(g_b, a, s)
    p_a = a.T @ torch.linalg.inv(a @ a.T) @ a
    torch.testing.assert_close(s * new @ a, g @ p_a)


@pytest.mark.parametrize("projected", [False, True])
def test_optimizer_trains_b_only(projected, tiny_llama_dir):
    model, cfg = adapted(tiny_llama_dir, "lora-fa", method_options={"projected_gradient": projected})
    optimizer = get_method(cfg.method).make_optimizer(model, cfg)
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    layers = adapter_layers(model).values()
    assert params == {id(layer.lora_B) for layer in layers}
    assert all(g["lr"] == cfg.lr for g in optimizer.param_groups)


def test_matches_peft_lorafa_optimizer(tiny_llama_dir, monkeypatch):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_lorafa_optimizer
    import peft.optimizers.lorafa as lorafa

    # peft projects under bf16 autocast when the CPU has bf16; the oracle runs in float32.
    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)
    from lora_studio.models import load_model

    ours, cfg = adapted(tiny_llama_dir, "lora-fa", lr=1e-3, method_options={"projected_gradient": True})
    ref = peft.get_peft_model(
        load_model(tiny_llama_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    pairs = []
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            m = ref.base_model.model.get_submodule(name)
            m.lora_A["default"].weight.copy_(layer.lora_A)
            m.lora_B["default"].weight.copy_(layer.lora_B)
            pairs.append((layer, m))
    opt_ref = create_lorafa_optimizer(ref, r=4, lora_alpha=8, lr=1e-3)
    trained_ref = {n for n, p in ref.named_parameters() if p.requires_grad}
    assert trained_ref and all(".lora_B." in n for n in trained_ref)
    assert opt_ref.param_groups[0]["lr"] == cfg.lr
    opt = get_method(cfg.method).make_optimizer(ours, cfg)
    # Adam's eps enters the two formulas differently (peft puts it before bias correction);
    # with eps = 0 they are the same update.
    for group in opt.param_groups + opt_ref.param_groups:
        group["eps"] = 0.0
    ids = sample_ids(ours.config.vocab_size, batch=4, length=16)
    for _ in range(4):
        for model, optimizer in ((ours, opt), (ref, opt_ref)):
            model.train()
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
    for layer, m in pairs:
        assert not torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
        torch.testing.assert_close(layer.lora_B, m.lora_B["default"].weight, rtol=0, atol=2e-6)
        assert torch.equal(layer.lora_A, m.lora_A["default"].weight)
