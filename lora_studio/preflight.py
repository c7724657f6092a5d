"""The checks before a run starts, shared by the Train tab and `python -m lora_studio train`.

Each refuses, with a message naming the setting, what the worker would otherwise only find
out after a run folder exists: a batch larger than the data (after the held-out split), a
config or target the model cannot take, a memory estimate beyond this machine. The inputs
are plain values (the config, and what a look at the data found), so the UI and the CLI ask
the same questions and get the same answers.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_studio.config import TrainConfig
from lora_studio.data.batching import held_out_count
from lora_studio.engine.memory import MemoryEstimate, estimate
from lora_studio.engine.plan import make_plan


def check_batch(batch_size: int, training_examples: int) -> None:
    """Refuse a batch larger than the training examples: every step would be the same full
    batch, which is a typo rather than a plan."""
    if batch_size > training_examples:
        raise ValueError(
            f"invalid training settings: batch_size ({batch_size}) is larger than the data "
            f"({training_examples} training examples); use a batch size of {training_examples} or less"
        )


def data_facts(preview: Any, max_seq_len: int) -> tuple[int, int | None]:
    """(usable rows, longest row in tokens within max_seq_len) from a data preview
    (lora_studio.data.inspect_data), the two numbers preflight takes about the data."""
    max_tokens = min(int(preview.stats["max"]), int(max_seq_len)) if preview.stats.get("n") else None
    return preview.report.n_usable, max_tokens


def machine_memory_mb(device: str) -> float:
    """What this machine has for a run on `device` ("cpu", or the GPU's memory)."""
    if device == "cpu":
        import psutil

        return psutil.virtual_memory().total / 2**20
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**20


def preflight(
    cfg: TrainConfig, rows: int | None = None, max_tokens: int | None = None, memory_mb: float | None = None,
    world: int = 1,
) -> MemoryEstimate:
    """Refuse (ValueError) a run that cannot start or cannot fit; else return its memory estimate.

    `rows`: the usable rows of the data (None: not known, the batch is not checked);
    `max_tokens`: the longest row in tokens (None: max_seq_len, the worst case);
    `memory_mb`: what the machine has (None: this machine's RAM, or its GPU's memory);
    `world`: processes (GPUs) the run will use: the estimate is then per rank, for the strategy
    `auto` picks (or the one asked for), and `fsdp` is refused where it cannot work.
    """
    cfg = cfg.resolved()
    if rows and not cfg.packing:
        check_batch(cfg.batch_size, rows - held_out_count(rows, cfg.val_fraction))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    have = memory_mb if memory_mb is not None else machine_memory_mb(device)
    # CPU ranks share the machine's RAM; each GPU rank has its own device
    per_rank = have / world if device == "cpu" else have
    try:
        # the strategy `auto` picks for this much memory per rank; fsdp refused where it cannot work
        est = estimate(make_plan(cfg, device, world, capacity_mb=per_rank), seq_len=max_tokens)
    except Exception as e:  # noqa: BLE001 - a config or a target the model cannot take; the text says which
        raise ValueError(f"cannot set up {cfg.method} on {cfg.model!r}: {e}") from None
    if est.total_mb > per_rank:
        more = " or shard it over the GPUs with --strategy fsdp" if world > 1 and est.strategy == "ddp" else ""
        raise ValueError(
            f"the memory estimate ({est.total_mb / 1024:,.1f} GiB{' per rank' if world > 1 else ''}) is more than "
            f"this machine has ({per_rank / 1024:,.1f} GiB{' per rank' if world > 1 else ''}): lower the rank, "
            f"batch size or max length{more}"
        )
    return est
