"""lora_studio.engine.fsdp: FSDP2 sharding on CPU ranks (gloo) against a single-process oracle, and the
rules that refuse what cannot be sharded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_studio.config import TrainConfig
from lora_studio.engine.fsdp import fsdp_refusal
from lora_studio.methods import REGISTRY, get_method
from lora_studio.runfiles import read_metrics, read_status
from tests.conftest import format_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_sharded_layers_match_one_process(tmp_path):
    # One launch, three layer methods: each rank holds 1/2 of the weights (base included); loss,
    # gradient norm and gathered adapter equal the unsharded model on the whole batch; a sharded
    # checkpoint loads back exactly. DoRA's column norm and VeRA's shared matrices included.
    # LoRA and DoRA also with bf16 compute (MixedPrecisionPolicy) against the fp32 reference:
    # their one product of base and term (`lowrank`) over FSDP's gathered weights.
    specs = ["lora", "dora", "vera", "lora:bf16", "dora:bf16"]
    out = torchrun([str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path), *specs])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in specs:
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
    ("probes", ["Say hi"], "probe prompts"), ("early_stop", 2, "early stopping"),
])
def test_settings_fsdp_cannot_honour_are_refused(field, value, words):
    why = fsdp_refusal(get_method("lora"), TrainConfig(**{field: value}))
    assert why and words in why


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "lora_studio", *args], env=env, capture_output=True, text=True, timeout=600)


def test_fsdp_run_equals_one_process_and_resumes(tiny_llama_dir, tmp_path):
    # Same global batch, fp32: 2 FSDP ranks (each 1/2 of the weights) log the loss of one process
    # at every step and write the same PEFT adapter; then the sharded checkpoint of step 6 is
    # resumed (a second launch) and step 7 lands on the same adapter again.
    data = write_jsonl(tmp_path / "train.jsonl", format_rows(25))  # last batch of 1: one rank idles
    val = write_jsonl(tmp_path / "val.jsonl", format_rows(5))  # 3 + 2 rows on the two ranks
    common = dict(data=str(data), model=tiny_llama_dir, rank=4, batch_size=4, epochs=1, eval_every=0, precision="fp32",
                  val_data=str(val))
    TrainConfig(out=str(tmp_path / "single"), checkpoint_every=0, **common).save(tmp_path / "single.json")
    # gradient checkpointing too: the recompute gathers each block's weights again (same numbers)
    TrainConfig(out=str(tmp_path / "fsdp"), checkpoint_every=3, grad_accum_steps=2, strategy="fsdp",
                gradient_checkpointing=True, **common).save(tmp_path / "fsdp.json")
    one = run_cli(["train", "--config", str(tmp_path / "single.json")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(["train", "--config", str(tmp_path / "fsdp.json"), "--gpus", "2"])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]

    run = tmp_path / "fsdp"
    status = read_status(run)
    assert status["state"] == "done" and status["world_size"] == 2 and status["strategy"] == "fsdp"
    assert status["memory_estimate"]["strategy"] == "fsdp" and status["memory_estimate"]["world"] == 2
    assert len(list((run / "checkpoints" / "step-000006").glob("*.distcp"))) == 2  # one shard per rank

    def adapter(folder: Path) -> dict[str, torch.Tensor]:
        return load_file(str(folder / "adapter" / "adapter_model.safetensors"))

    a, b = adapter(tmp_path / "single"), adapter(run)
    assert a.keys() == b.keys()
    assert all(a[k].abs().max() > 1e-4 for k in a if k.endswith("lora_B.weight"))  # it trained
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-6)
    ma, mb = read_metrics(tmp_path / "single"), read_metrics(run)
    assert [r["loss"] for r in mb] == pytest.approx([r["loss"] for r in ma], rel=2e-3)
    assert [r["grad_norm"] for r in mb] == pytest.approx([r["grad_norm"] for r in ma], rel=2e-3)
    assert mb[-1]["eval_loss"] == pytest.approx(ma[-1]["eval_loss"], rel=2e-3)  # sharded eval, uneven shares
    assert len(mb[-1]["rank_peak_mb"]) == 2 and min(mb[-1]["rank_peak_mb"]) > 0  # measured on each rank
    config = (tmp_path / "single" / "adapter" / "adapter_config.json").read_text()
    assert (run / "adapter" / "adapter_config.json").read_text() == config

    shutil.rmtree(run / "adapter")
    again = run_cli(["train", "--resume", str(run), "--gpus", "2"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert read_status(run)["resumed_from"] == 6
    for key, value in adapter(run).items():
        torch.testing.assert_close(value, a[key], rtol=1e-3, atol=1e-6)
    assert [r["loss"] for r in read_metrics(run)] == pytest.approx([r["loss"] for r in ma], rel=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_nccl_bf16_on_two_gpus(tmp_path):  # pragma: no cover - GPU machines only
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path), "cuda", "lora", "lora:bf16", "dora:bf16"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("OK ") == 6
