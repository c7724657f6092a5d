"""Trainable and total parameter counts, checked against r·(d_in + d_out) per adapted layer."""

from __future__ import annotations

from lora_studio.methods import adapter_layers, count_parameters
from lora_studio.models import load_model
from tests.helpers import adapted


def test_lora_counts_match_the_formula(tiny_model_dir):
    base_total = sum(p.numel() for p in load_model(tiny_model_dir).parameters())
    model, cfg = adapted(tiny_model_dir, "lora", rank=4)
    trainable, total = count_parameters(model)
    layers = adapter_layers(model)
    expected = sum(cfg.rank * (layer.in_features + layer.out_features) for layer in layers.values())
    assert trainable == expected > 0
    assert total == base_total + expected
    # all-linear adapts every block linear but never the LM head
    assert not any("lm_head" in name for name in layers)
    assert len(layers) == 2 * (7 if model.config.model_type == "llama" else 4)
