"""The step count and the learning-rate schedule (the optimizer itself is the method's:
`Method.make_optimizer`)."""

from __future__ import annotations

import math

import torch

from lora_studio.config import TrainConfig


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over `warmup` steps, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plan_steps(cfg: TrainConfig, n_batches: int) -> int:
    """Optimizer steps of a run: `epochs` passes over `n_batches` batches, capped by `max_steps`."""
    total = max(1, math.ceil(cfg.epochs * n_batches))
    return min(total, cfg.max_steps) if cfg.max_steps else total
