"""lora_studio.fsdp: FSDP2 sharding on CPU ranks (gloo) against a single-process oracle, and the
rules that refuse what cannot be sharded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.fsdp import fsdp_refusal
from lora_studio.methods import REGISTRY, get_method

ROOT = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_sharded_layers_match_one_process(tmp_path):
    # One launch, three layer methods: each rank holds 1/2 of the weights (base included); loss,
    # gradient norm and gathered adapter equal the unsharded model on the whole batch; a sharded
    # checkpoint loads back exactly. DoRA's column norm and VeRA's shared matrices included.
    out = torchrun([str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path), "lora", "dora", "vera"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("lora", "dora", "vera"):
        for rank in (0, 1):
            assert f"OK {name} rank{rank}" in out.stdout


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_method_says_whether_it_shards(name):
    method = get_method(name)
    options = {"projected_gradient": True} if name == "lora-fa" else {}
    why = fsdp_refusal(method, TrainConfig(method=name, method_options=options))
    if name in ("lora-pro", "lora-fa", "delta-lora"):  # maths on whole A, B or W outside a layer's forward
        assert why and method.title in why and "--strategy ddp" in why
    else:
        assert why is None
    if name == "lora-fa":  # A frozen and plain AdamW on B: nothing needs a whole tensor
        assert fsdp_refusal(method, TrainConfig(method=name)) is None


@pytest.mark.parametrize("field,value,words", [
    ("quantize", "4bit", "4-bit"), ("merge", True, "--merge"), ("precision", "fp16", "bf16"),
])
def test_settings_fsdp_cannot_honour_are_refused(field, value, words):
    why = fsdp_refusal(get_method("lora"), TrainConfig(**{field: value}))
    assert why and words in why
