"""PEFT-format export: files as peft writes them, loaded by peft with our logits, and back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lora_studio.adapters import load_adapter, save_adapter
from lora_studio.methods import REGISTRY, adapter_layers, get_method
from lora_studio.models import load_model
from tests.helpers import adapted, logits, perturb, sample_ids


def test_files_follow_peft_layout(tiny_llama_dir, tmp_path):
    model, cfg = adapted(tiny_llama_dir, "lora")
    save_adapter(model, tmp_path, cfg.to_dict(), "some/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["base_model_name_or_path"] == "some/base"
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape == (4, 32)
        assert f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight").shape == (32, 4)
    assert len(keys) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    assert not any("lm_head" in k for k in keys)


def test_partial_targets_are_written_as_full_paths(tiny_llama_dir, tmp_path):
    model, cfg = adapted(tiny_llama_dir, "lora", target="model.layers.0.self_attn.q_proj")
    save_adapter(model, tmp_path, cfg.to_dict(), "x")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter_with_our_logits(tiny_model_dir, tmp_path, rslora):
    peft = pytest.importorskip("peft")
    model, cfg = adapted(tiny_model_dir, "lora", use_rslora=rslora)
    perturb(model)
    ids = sample_ids(model.config.vocab_size)
    ours = logits(model, ids)
    save_adapter(model, tmp_path, cfg.to_dict(), tiny_model_dir)
    ref = peft.PeftModel.from_pretrained(load_model(tiny_model_dir), str(tmp_path))
    torch.testing.assert_close(logits(ref, ids), ours, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, logits(load_model(tiny_model_dir), ids), atol=1e-3)


@pytest.mark.parametrize("method", list(REGISTRY))
def test_peft_loads_every_method_s_adapter(tiny_model_dir, tmp_path, method):
    """LoRA-family adapters (DoRA as use_dora, Delta-LoRA as plain LoRA) and VeRA's, in peft."""
    peft = pytest.importorskip("peft")
    model, cfg = adapted(tiny_model_dir, method)
    perturb(model, scale=0.3)
    ids = sample_ids(model.config.vocab_size)
    ours = logits(model, ids)
    save_adapter(model, tmp_path, cfg.to_dict(), tiny_model_dir)
    ref = peft.PeftModel.from_pretrained(load_model(tiny_model_dir), str(tmp_path))
    assert ref.peft_config["default"].peft_type == get_method(method).peft_type
    assert getattr(ref.peft_config["default"], "use_dora", False) == (method == "dora")
    torch.testing.assert_close(logits(ref, ids), ours, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, logits(load_model(tiny_model_dir), ids), atol=1e-3)


@pytest.mark.parametrize("use_dora", [False, True])
def test_we_load_a_peft_saved_adapter(tiny_llama_dir, tmp_path, use_dora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", use_dora=use_dora
    )
    ref = peft.get_peft_model(load_model(tiny_llama_dir), config)
    perturb(ref)
    ids = sample_ids(ref.config.vocab_size)
    expected = logits(ref, ids)
    ref.save_pretrained(str(tmp_path))
    ours = load_model(tiny_llama_dir)
    record = load_adapter(ours, tmp_path)
    assert record["method"] == ("dora" if use_dora else "lora")
    assert len(adapter_layers(ours)) == 4
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=1e-5)


def test_mismatched_tensors_are_an_error(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model, cfg = adapted(tiny_llama_dir, "lora")
    save_adapter(model, tmp_path, cfg.to_dict(), "x")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="match no layer"):
        load_adapter(load_model(tiny_llama_dir), tmp_path)
