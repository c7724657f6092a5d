"""Delta-LoRA: W after N steps against W0 + λ·s·(B_N A_N − B_K A_K), the rank-2r export
(ours and peft's loaders), disable and merge once W has moved, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from lora_studio.adapters import load_adapter, save_adapter
from lora_studio.methods import adapter_layers, disable_adapter, get_method, merge_adapters
from lora_studio.methods.delta_lora import start_step
from lora_studio.methods.lora import LoRALinear
from lora_studio.models import load_model
from tests.helpers import adapted, logits, method_cfg, sample_ids

K, N, LAM = 2, 5, 2.0


def _train(model_dir: str, steps: int = N, k: int = K):
    """N real optimizer steps; returns the model, cfg, W0 and (A_K, B_K) per layer (W layout)."""
    model, cfg = adapted(model_dir, "delta-lora", lr=1e-2, method_options={"start_step": k, "lambda": LAM})
    layers = adapter_layers(model)
    w0 = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
    at_k = {n: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for n, layer in layers.items()}
    optimizer = get_method(cfg.method).make_optimizer(model, cfg)
    method = get_method("delta-lora")
    model.train()
    for step in range(1, steps + 1):
        ids = sample_ids(model.config.vocab_size, batch=4, length=16, seed=step)
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        method.after_step(model, cfg, step)
        if step == k:
            at_k = {n: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for n, layer in layers.items()}
    return model, cfg, w0, at_k


def test_w_after_n_steps_follows_the_rule(tiny_model_dir):
    model, cfg, w0, at_k = _train(tiny_model_dir)
    for name, layer in adapter_layers(model).items():
        a_k, b_k = at_k[name]
        delta = LAM * layer.scaling * (layer.lora_B @ layer.lora_A - b_k @ a_k)  # (d_out, d_in)
        expected = w0[name] + (delta.T if layer.fan_in_fan_out else delta)
        torch.testing.assert_close(layer.base.weight, expected, rtol=0, atol=2e-6)
        assert (layer.base.weight - w0[name]).abs().max() > 1e-4  # it really moved
        assert layer.base.weight.grad is None and not layer.base.weight.requires_grad


def test_w_untouched_until_step_k(tiny_llama_dir):
    model, _, w0, _ = _train(tiny_llama_dir, steps=K)
    for name, layer in adapter_layers(model).items():
        assert torch.equal(layer.base.weight, w0[name])


def test_export_is_an_exact_rank_2r_lora(tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, cfg, _, _ = _train(tiny_model_dir)
    model.eval()
    ids = sample_ids(model.config.vocab_size)
    expected = logits(model, ids)
    save_adapter(model, tmp_path, cfg.to_dict(), tiny_model_dir)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    layer = next(iter(adapter_layers(model).values()))
    assert config["r"] == 2 * cfg.rank and config["lora_alpha"] == pytest.approx(2 * cfg.rank * layer.scaling)
    ref = peft.PeftModel.from_pretrained(load_model(tiny_model_dir), str(tmp_path))
    torch.testing.assert_close(logits(ref, ids), expected, atol=1e-4, rtol=1e-4)
    ours = load_model(tiny_model_dir)
    record = load_adapter(ours, tmp_path)
    assert record["method"] == "delta-lora"
    assert all(type(m) is LoRALinear and m.rank == 2 * cfg.rank for m in adapter_layers(ours).values())
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, logits(load_model(tiny_model_dir), ids), atol=1e-3)
    with disable_adapter(ours):  # the reloaded base is the untouched one
        assert torch.equal(logits(ours, ids), logits(load_model(tiny_model_dir), ids))


def test_disable_and_merge_once_w_moved(tiny_model_dir):
    model, _, _, _ = _train(tiny_model_dir)
    base = load_model(tiny_model_dir)
    ids = sample_ids(base.config.vocab_size)
    tuned = logits(model, ids)
    with disable_adapter(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-5, rtol=1e-5)
    merge_adapters(model)
    torch.testing.assert_close(logits(model, ids), tuned, atol=1e-4, rtol=1e-4)


def test_start_step_default():
    assert start_step(method_cfg("delta-lora")) == 500
    assert start_step(method_cfg("delta-lora", max_steps=200)) == 20
    assert start_step(method_cfg("delta-lora", max_steps=20000)) == 500
    assert start_step(method_cfg("delta-lora", method_options={"start_step": 7})) == 7


def test_refusals(tiny_llama_dir):
    with pytest.raises(ValueError, match="without dropout"):
        adapted(tiny_llama_dir, "delta-lora", dropout=0.1)
    with pytest.raises(ValueError, match="no option lamda"):
        adapted(tiny_llama_dir, "delta-lora", method_options={"lamda": 3})
    with pytest.raises(ValueError, match="cannot train on a 4-bit base.*without --quantize"):
        adapted(tiny_llama_dir, "delta-lora", quantize="4bit")
