"""Two "nodes" on one machine: two torchrun launches with --nnodes 2 that meet over loopback
(c10d rendezvous, as docs/distributed.md shows for real nodes), one CPU rank each, train DDP
into one run folder that both see; the result equals one process with the same global batch."""

from __future__ import annotations

import os
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_equal_one_process(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", format_rows(16))
    common = dict(data=str(data), model=tiny_llama_dir, rank=4, batch_size=4, epochs=1, checkpoint_every=0, eval_every=0,
                  precision="fp32")
    TrainConfig(out=str(tmp_path / "single"), **common).save(tmp_path / "single.json")
    TrainConfig(out=str(tmp_path / "nodes"), strategy="ddp", **common).save(tmp_path / "nodes.json")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    one = subprocess.run([sys.executable, "-m", "lora_studio", "train", "--config", str(tmp_path / "single.json")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    endpoint = f"127.0.0.1:{free_port()}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
              "-m", "lora_studio", "train", "--config", str(tmp_path / "nodes.json")]
    nodes = [subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, out in zip(nodes, outs):
        assert p.returncode == 0, out[-3000:]

    status = read_status(tmp_path / "nodes")
    assert status["state"] == "done" and status["world_size"] == 2 and status["strategy"] == "ddp"
    assert status["host"]  # written once, by global rank 0
    a = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "nodes" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(a[k].abs().max() > 1e-4 for k in a if k.endswith("lora_B.weight"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    la = [r["loss"] for r in read_metrics(tmp_path / "single")]
    assert [r["loss"] for r in read_metrics(tmp_path / "nodes")] == pytest.approx(la, rel=1e-5)
