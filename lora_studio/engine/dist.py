"""Where this process sits in a torchrun job, how one optimizer step's batch is split over the
ranks, and the few collectives the loop needs (all no-ops on one process)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    """Where this process sits in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_distributed() -> DistEnv:
    """Join the process group torchrun describes in the environment (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return env


def close_distributed(env: DistEnv) -> None:
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def split_evenly(items: list[int], parts: int) -> list[list[int]]:
    """`parts` contiguous chunks whose sizes differ by at most one (some empty if items are few)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def shard_batch(ids: list[int], env: DistEnv, accum: int) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step's batch (empty ones dropped).

    Ranks take every world-th sample of the length-sorted batch, so their sequences are
    about as long as each other's; micro-batches are contiguous runs, so lengths within
    one are similar (little padding).
    """
    mine = ids[env.rank :: env.world]
    return [chunk for chunk in split_evenly(mine, accum) if chunk]


def all_sum(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    """The element-wise sum over all ranks (float64)."""
    if env.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def from_main(value: int, env: DistEnv, device: torch.device) -> int:
    """Rank 0's `value`, on every rank."""
    if env.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()


def wrap_for_ranks(module: torch.nn.Module, env: DistEnv, device: torch.device) -> torch.nn.Module:
    """The module the loop calls for its loss: DistributedDataParallel over it under torchrun."""
    if env.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,  # buffers are identical on every rank and never trained
    )
