"""lora_studio/engine/plan.py: the one place a run's precision (and the rest of its Plan) is decided."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lora_studio.engine import loop, memory, plan as precision
from lora_studio.config import TrainConfig
from lora_studio.methods import REGISTRY


def test_cpu_auto_precision_follows_the_measured_bf16_speed(monkeypatch):
    cpu = torch.device("cpu")
    cfg = TrainConfig(data="x", out="x")
    assert precision.resolve_precision(dataclasses.replace(cfg, precision="fp32"), cpu) == (None, torch.float32)
    assert precision.resolve_precision(dataclasses.replace(cfg, precision="bf16"), cpu) == (torch.bfloat16, torch.float32)
    monkeypatch.setattr(precision, "bf16_pays", lambda device: True)
    assert precision.resolve_precision(cfg, cpu) == (torch.bfloat16, torch.float32)
    assert precision.resolve_precision(dataclasses.replace(cfg, quantize="4bit"), cpu) == (None, torch.float32)
    monkeypatch.setattr(precision, "bf16_pays", lambda device: False)
    assert precision.resolve_precision(cfg, cpu) == (None, torch.float32)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        precision.resolve_precision(TrainConfig(data="x", out="x", precision="fp16"), torch.device("cpu"))


def test_frozen_linears_go_to_bf16_only_under_bf16_autocast_on_an_fp32_base_left_as_it_is():
    cfg = TrainConfig(data="x", out="x")
    bf16, fp32 = torch.bfloat16, torch.float32
    assert precision.stores_frozen_linears_in_bf16(cfg, bf16, fp32)
    assert not precision.stores_frozen_linears_in_bf16(cfg, None, fp32)
    assert not precision.stores_frozen_linears_in_bf16(cfg, bf16, bf16)  # already bf16
    assert not precision.stores_frozen_linears_in_bf16(dataclasses.replace(cfg, merge=True), bf16, fp32)
    assert not precision.stores_frozen_linears_in_bf16(dataclasses.replace(cfg, quantize="4bit"), bf16, fp32)
    writes_base = next(name for name, m in REGISTRY.items() if m.writes_base)  # Delta-LoRA
    assert not precision.stores_frozen_linears_in_bf16(dataclasses.replace(cfg, method=writes_base), bf16, fp32)


def test_the_loop_and_the_estimate_use_the_same_rule():
    # One decision, not two: the loop and the memory estimate read the Plan, neither decides itself.
    assert not hasattr(loop, "resolve_precision") and not hasattr(memory, "resolve_precision")
    cfg = TrainConfig(data="x", out="x", precision="bf16")
    plan = precision.make_plan(cfg, "cpu")
    assert (plan.autocast_dtype, plan.base_dtype) == precision.resolve_precision(cfg.resolved(), torch.device("cpu"))
    assert plan.frozen_linears_bf16 and plan.precision == "bfloat16"


def test_a_plan_is_made_once_and_frozen():
    plan = precision.make_plan(TrainConfig(data="x", out="x", method="lora-plus", batch_size=8, grad_accum_steps=3), "cpu", world=2)
    assert plan.method is REGISTRY["lora-plus"] and plan.cfg.lr_ratio == REGISTRY["lora-plus"].defaults["lr_ratio"]
    assert plan.micro_batch == 2 and plan.eval_batch == 2  # ceil(8 / (3 * 2)); 8 // 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.world = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="lr_ratio"):
        precision.make_plan(TrainConfig(data="x", out="x", method="lora", lr_ratio=4.0), "cpu")
