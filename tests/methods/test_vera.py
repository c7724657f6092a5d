"""VeRA: the shared seeded pair, the forward against its equation and peft's, parameter
counts, and adapter files both ways with peft."""

from __future__ import annotations

import json

import pytest
import torch

from lora_studio.adapters import load_adapter, save_adapter
from lora_studio.methods import adapter_layers, count_parameters, merge_adapters
from lora_studio.methods.vera import VeRAShared
from lora_studio.models import load_model
from tests.helpers import adapted, logits, perturb, sample_ids


def _peft_vera(model_dir: str, rank: int = 4, **kw):
    peft = pytest.importorskip("peft")
    model = load_model(model_dir)
    fan_in_fan_out = "gpt2" in type(model).__name__.lower()
    config = peft.VeraConfig(r=rank, target_modules="all-linear", fan_in_fan_out=fan_in_fan_out, **kw)
    return peft.get_peft_model(model, config)


def test_one_shared_pair_frozen_and_moved_with_the_model(tiny_llama_dir):
    model, _ = adapted(tiny_llama_dir, "vera")
    layers = list(adapter_layers(model).values())
    shared = {id(layer.shared) for layer in layers}
    assert len(shared) == 1
    pair = layers[0].shared
    assert pair.vera_A.shape == (4, 64) and pair.vera_B.shape == (64, 4)  # largest d_in, d_out: the MLP
    assert not any("vera_A" in n or "vera_B" in n for n, _ in model.named_parameters())
    assert not any("vera_A" in k or "vera_B" in k for k in model.state_dict())
    model.to(torch.float64)
    assert all(layer.shared.vera_A.dtype == torch.float64 for layer in layers)
    assert layers[0].shared is layers[-1].shared


def test_trainable_parameters_are_d_out_plus_r(tiny_model_dir):
    model, cfg = adapted(tiny_model_dir, "vera")
    layers = adapter_layers(model).values()
    trainable, _ = count_parameters(model)
    assert trainable == sum(layer.out_features + cfg.rank for layer in layers)
    for layer in layers:
        assert torch.equal(layer.vera_lambda_b, torch.zeros(layer.out_features))
        assert torch.equal(layer.vera_lambda_d, torch.full((cfg.rank,), 0.1))


def test_pair_is_peft_s_seeded_draw(tiny_model_dir):
    ref = _peft_vera(tiny_model_dir, projection_prng_key=7)
    ours, _ = adapted(tiny_model_dir, "vera", method_options={"projection_prng_key": 7})
    pair = next(iter(adapter_layers(ours).values())).shared
    assert torch.equal(pair.vera_A, ref.base_model.vera_A["default"])
    assert torch.equal(pair.vera_B, ref.base_model.vera_B["default"])
    other = VeRAShared(4, pair.vera_A.shape[1], pair.vera_B.shape[0], seed=8)
    assert not torch.equal(other.vera_A, pair.vera_A)


def test_forward_is_the_equation(tiny_llama_dir):
    model, _ = adapted(tiny_llama_dir, "vera")
    perturb(model, scale=0.5)
    layer = adapter_layers(model)["model.layers.0.self_attn.k_proj"]  # 32 -> 16: both sliced
    a = layer.shared.vera_A[:, :32]
    b = layer.shared.vera_B[:16]
    x = torch.randn(3, 32)
    expected = layer.base(x) + layer.vera_lambda_b * ((layer.vera_lambda_d * (x @ a.T)) @ b.T)
    torch.testing.assert_close(layer(x), expected)
    merged = layer.merged_layer()
    torch.testing.assert_close(merged(x), expected)


def test_forward_equals_peft(tiny_model_dir):
    ref = _peft_vera(tiny_model_dir)
    ours, _ = adapted(tiny_model_dir, "vera")
    perturb(ours, scale=0.5)
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            m = ref.base_model.model.get_submodule(name)
            m.vera_lambda_b["default"].copy_(layer.vera_lambda_b)
            m.vera_lambda_d["default"].copy_(layer.vera_lambda_d)
    ids = sample_ids(ours.config.vocab_size)
    expected = logits(ref, ids)
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, logits(load_model(tiny_model_dir), ids), atol=1e-3)


def test_peft_loads_our_vera_adapter(tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, cfg = adapted(tiny_model_dir, "vera", method_options={"projection_prng_key": 3, "d_initial": 0.2})
    perturb(model, scale=0.5)
    ids = sample_ids(model.config.vocab_size)
    expected = logits(model, ids)
    save_adapter(model, tmp_path, cfg.to_dict(), tiny_model_dir)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["projection_prng_key"] == 3 and config["d_initial"] == 0.2
    assert "lora_alpha" not in config
    ref = peft.PeftModel.from_pretrained(load_model(tiny_model_dir), str(tmp_path))
    assert isinstance(ref.peft_config["default"], peft.VeraConfig)
    torch.testing.assert_close(logits(ref, ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("save_projection", [True, False])
def test_we_load_a_peft_vera_adapter(tiny_llama_dir, tmp_path, save_projection):
    ref = _peft_vera(tiny_llama_dir, projection_prng_key=5, save_projection=save_projection)
    perturb(ref, scale=0.5)
    ids = sample_ids(ref.config.vocab_size)
    expected = logits(ref, ids)
    ref.save_pretrained(str(tmp_path))
    ours = load_model(tiny_llama_dir)
    record = load_adapter(ours, tmp_path)  # without projections the seed regrows them
    assert record["method"] == "vera"
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=1e-5)


def test_merge_removes_the_shared_pair(tiny_llama_dir):
    model, _ = adapted(tiny_llama_dir, "vera")
    perturb(model)
    merge_adapters(model)
    assert not any(isinstance(m, VeRAShared) for m in model.modules())
