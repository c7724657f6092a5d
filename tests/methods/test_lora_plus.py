"""LoRA+: parameter groups and learning rates, against peft's `create_loraplus_optimizer`."""

from __future__ import annotations

import pytest
import torch

from lora_studio.engine.optim import linear_schedule
from lora_studio.methods import adapter_layers, get_method
from lora_studio.models import load_model
from tests.helpers import adapted


def _peft_name(name: str) -> str:
    """`...q_proj.lora_A` (ours) -> `base_model.model....q_proj.lora_A.default.weight` (peft)."""
    module, kind = name.rsplit(".", 1)
    return f"base_model.model.{module}.{kind}.default.weight"


def test_default_ratio_is_16_and_b_gets_it(tiny_llama_dir):
    model, cfg = adapted(tiny_llama_dir, "lora-plus")
    assert cfg.lr_ratio == 16.0
    optimizer = get_method(cfg.method).make_optimizer(model, cfg)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for layer in adapter_layers(model).values():
        assert lr_of[id(layer.lora_A)] == cfg.lr
        assert lr_of[id(layer.lora_B)] == cfg.lr * 16


@pytest.mark.parametrize("ratio", [4.0, 16.0])
def test_groups_and_lrs_equal_peft(tiny_model_dir, ratio):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    ours, cfg = adapted(tiny_model_dir, "lora-plus", lr_ratio=ratio, lr=3e-4)
    opt = get_method(cfg.method).make_optimizer(ours, cfg)
    names = {id(p): n for n, p in ours.named_parameters()}
    ours_lr = {_peft_name(names[id(p)]): g["lr"] for g in opt.param_groups for p in g["params"]}

    fan_in_fan_out = "gpt2" in type(ours).__name__.lower()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=fan_in_fan_out)
    ref = peft.get_peft_model(load_model(tiny_model_dir), config)
    ref_opt = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=3e-4, loraplus_lr_ratio=ratio)
    ref_names = {id(p): n for n, p in ref.named_parameters()}
    ref_lr = {ref_names[id(p)]: g["lr"] for g in ref_opt.param_groups for p in g["params"]}
    assert ours_lr == ref_lr
    assert sorted(set(ours_lr.values())) == [3e-4, 3e-4 * ratio]


def test_schedule_keeps_the_ratio(tiny_llama_dir):
    model, cfg = adapted(tiny_llama_dir, "lora-plus")
    optimizer = get_method(cfg.method).make_optimizer(model, cfg)
    scheduler = linear_schedule(optimizer, warmup=2, total=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        lr_a, lr_b = (g["lr"] for g in optimizer.param_groups)
        assert lr_a > 0 and lr_b == pytest.approx(16 * lr_a)


@pytest.mark.parametrize("method", ["lora", "dora", "lora-pro"])
def test_lr_ratio_elsewhere_is_refused(tiny_llama_dir, method):
    with pytest.raises(ValueError, match="only applies to lora-plus"):
        adapted(tiny_llama_dir, method, lr_ratio=4.0)
