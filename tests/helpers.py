"""Helpers the tests share (the fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

from lora_studio import runfiles as rf
from lora_studio.config import TrainConfig
from lora_studio.methods import get_method, inject_adapters, trainable_parameters
from lora_studio.models import load_model
from lora_studio.engine.loss import causal_lm_loss
from lora_studio.runner import SUPERVISOR, pid_alive


def method_cfg(method: str, **overrides) -> TrainConfig:
    base = dict(data="unused.jsonl", out="unused", method=method, rank=4, seed=0)
    base.update(overrides)
    return TrainConfig(**base).resolved()


def adapted(model_dir: str, method: str, **overrides) -> tuple[nn.Module, TrainConfig]:
    cfg = method_cfg(method, model=model_dir, **overrides)
    model = load_model(model_dir)
    torch.manual_seed(cfg.seed)
    inject_adapters(model, get_method(method), cfg)
    return model, cfg


def perturb(model: nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    """Give every trainable tensor random values, so an adapter that does nothing cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def learning_progress(model: nn.Module, bf16: bool, steps: int = 4, method: str = "lora", **options) -> float:
    """Loss after `steps` - 1 fused-AdamW updates minus the loss before, on one batch, from B = 0
    at the default learning rate: the first updates of B are small next to the base outputs."""
    cfg = TrainConfig(data="x", out="x", rank=4, method=method, **options).resolved()
    optimizer = get_method(method).make_optimizer(model, cfg)
    ids = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    losses = []
    model.train()
    for _ in range(steps):
        torch.manual_seed(1)  # the same dropout masks in fp32 and bf16
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, n = causal_lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() / n)
    return losses[-1] - losses[0]


def sample_ids(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def fake_checkpoints(run_dir: Path, complete: list[int], cut_short: tuple[int, ...] = ()) -> None:
    """Checkpoint folders as a run leaves them: complete ones have state.json (written last),
    a save cut short has not."""
    for step in [*complete, *cut_short]:
        folder = run_dir / rf.CHECKPOINTS / f"step-{step:06d}"
        folder.mkdir(parents=True)
        if step in complete:
            (folder / "state.json").write_text("{}")


def wait_for(predicate, timeout: float = 120, what: str = "condition", context=None, every: float = 0.05):
    """Poll until predicate() is truthy, every `every` s; on timeout, context() (e.g. the run's status
    and log) is put in the message, since a CI log is all there is to read afterwards."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}" + (f"; {context()}" if context else ""))


def run_pids(run_dir: Path) -> list[tuple[int, float]]:
    """(pid, start time) of the run's supervisor, worker and trainer as recorded in its folder."""
    sup, status = rf.read_json(run_dir / SUPERVISOR), rf.read_status(run_dir)
    pairs = [(sup.get("pid"), sup.get("pid_started")), (sup.get("worker_pid"), sup.get("worker_started")),
             (status.get("pid"), status.get("pid_started"))]  # fmt: skip
    return [(p, t) for p, t in pairs if p]


def kill_run_processes(runs_dir: Path) -> None:
    """SIGKILL every training process a test left running under `runs_dir` (by recorded pid)."""
    for run_dir in (d for d in runs_dir.glob("*") if d.is_dir()):
        for pid, started in run_pids(run_dir):
            # The process may end between the check and the kill: that is what we wanted anyway.
            if pid_alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
