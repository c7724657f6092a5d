"""lora_studio/precision.py: the one place a run's precision is decided."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lora_studio import memory, precision, train
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
    writes_base = next(name for name, m in REGISTRY.items() if m.after_step is not None)  # Delta-LoRA
    assert not precision.stores_frozen_linears_in_bf16(dataclasses.replace(cfg, method=writes_base), bf16, fp32)


def test_the_loop_and_the_estimate_use_the_same_rule():
    # One function, not two copies: what the loop and the memory estimate call is this one.
    assert train.resolve_precision is precision.resolve_precision
    assert memory.resolve_precision is precision.resolve_precision
