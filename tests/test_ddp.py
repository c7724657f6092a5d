"""Several processes: the CLI's `--gpus 2` re-runs itself under torchrun; with 2 CPU processes on
gloo, the adapter after N steps equals the single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_studio.config import TrainConfig
from lora_studio.runfiles import read_metrics, read_status
from tests.conftest import format_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    # CPU processes on gloo, also on a machine with a GPU (one GPU cannot host two ranks).
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "lora_studio", *args], env=env, capture_output=True, text=True, timeout=600)


def test_two_gloo_processes_equal_one_process(tiny_llama_dir, tmp_path):
    # 25 rows in batches of 4: the last batch of the epoch has 1 sample, so one rank has
    # nothing and must still join the gradient all-reduce; accumulation splits rank shares.
    data = write_jsonl(tmp_path / "train.jsonl", format_rows(25))
    common = dict(data=str(data), model=tiny_llama_dir, rank=4, batch_size=4, epochs=1, checkpoint_every=0, eval_every=0,
                  precision="fp32")  # an equality test: `auto` may pick bf16
    single = TrainConfig(out=str(tmp_path / "single"), **common)
    double = TrainConfig(out=str(tmp_path / "ddp"), grad_accum_steps=2, **common)
    single.save(tmp_path / "single.json")
    double.save(tmp_path / "ddp.json")

    one = run_cli(["train", "--config", str(tmp_path / "single.json")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(["train", "--config", str(tmp_path / "ddp.json"), "--gpus", "2"])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "torch.distributed.run" in two.stdout  # it really relaunched under torchrun

    status = read_status(tmp_path / "ddp")
    assert status["state"] == "done" and status["world_size"] == 2 and status["step"] == 7
    assert status["strategy"] == "ddp"  # auto: the tiny model fits
    a = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = [k for k in a if k.endswith("lora_B.weight")]
    assert all(a[k].abs().max() > 1e-4 for k in moved)  # training happened: B left zero
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    la = [r["loss"] for r in read_metrics(tmp_path / "single")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "ddp")]
    assert lb == pytest.approx(la, rel=1e-5)
    # Adam would forgive a gradient scaled by a constant; the logged norm does not.
    ga = [r["grad_norm"] for r in read_metrics(tmp_path / "single")]
    gb = [r["grad_norm"] for r in read_metrics(tmp_path / "ddp")]
    assert gb == pytest.approx(ga, rel=1e-5)
    assert [r["tokens"] for r in read_metrics(tmp_path / "ddp")] == [r["tokens"] for r in read_metrics(tmp_path / "single")]
    assert not list((tmp_path / "ddp").glob("error-rank*.log"))
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["grad_accum_steps"] == 2
