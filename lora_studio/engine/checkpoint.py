"""Resumable checkpoints: everything a run needs to continue exactly where it stopped.

    RUN/checkpoints/step-000050/
      model.safetensors    every trainable tensor by parameter name; for methods that also
                           change the base after each step (Delta-LoRA), the adapted layers'
                           base weights too
      optimizer.pt         optimizer, scheduler and grad-scaler state dicts (torch.save, read
                           back with weights_only=True: plain tensors and numbers only)
      rng-rank0.safetensors  torch CPU (and CUDA) RNG state and the data-order generator's
                           state at the start of the current epoch; one file per DDP rank
      state.json           step, epoch, batches done in the epoch, elapsed time, world size;
                           written last, so a folder without it is incomplete and ignored

A checkpoint is written into `step-N.tmp/` and renamed when complete; only then are older
ones deleted, so a crash or kill at any moment leaves the last good checkpoint readable. The
two newest are kept: a resume that finds the newest unreadable (a disk error, a file cut
short) falls back to the one before it. No checkpoint ever holds NaN or inf weights.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_studio import runfiles as rf
from lora_studio.adapters import require_finite
from lora_studio.methods import adapter_layers, trainable_parameters
from lora_studio.methods.base import Method

CHECKPOINTS = rf.CHECKPOINTS
KEEP = 2
"""Complete checkpoints kept per run: the newest, and one to fall back to."""


def checkpoint_tensors(model: nn.Module, method: Method) -> dict[str, torch.Tensor]:
    """The model tensors that training changes: what a resume must restore."""
    tensors = dict(trainable_parameters(model))
    if method.writes_base:  # e.g. an after-step rule that writes the frozen base weight
        for name, layer in adapter_layers(model).items():
            tensors[f"{name}.base.weight"] = layer.base.weight
    return tensors


def rng_state(device: torch.device, data_generator_state: torch.Tensor) -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state(), "data_epoch_start": data_generator_state}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


def tmp_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}.tmp"


def write_rank_rng(folder: Path, rank: int, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"rng-rank{rank}.safetensors"))


def _disk_full(folder: Path) -> bool:
    """Whether the filesystem holding `folder` has (almost) no space left."""
    try:
        return shutil.disk_usage(folder.parent).free < 1 << 20
    except OSError:
        return False


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_tensors: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
) -> Path:
    """Finish the checkpoint of `step` (rank files already in its tmp folder), then swap it in."""
    folder = tmp_dir(run_dir, step)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_tensors.items()}
        require_finite(cpu, f"the checkpoint of step {step}")
        save_file(cpu, str(folder / "model.safetensors"), metadata={"step": str(step)})
        torch.save(optimizer_state, folder / "optimizer.pt")
        (folder / "state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2, sort_keys=True) + "\n")
        _fsync_dir_files(folder)
    except BaseException as e:  # disk full, read-only, killed: drop the half-written copy (frees space too)
        # torch.save reports a full disk as a bare "[enforce fail ...] unexpected pos" error: ask the disk
        full = isinstance(e, Exception) and not isinstance(e, OSError) and _disk_full(folder)
        shutil.rmtree(folder, ignore_errors=True)
        if full:
            raise OSError(errno.ENOSPC, f"No space left on device ({e.__class__.__name__}: {e})", f"step-{step:06d}") from e
        raise
    final = run_dir / CHECKPOINTS / f"step-{step:06d}"
    if final.exists():  # the same step saved again (stop right after a periodic save)
        shutil.rmtree(final)
    os.replace(folder, final)
    others = [(n, path) for n, path in rf.checkpoint_folders(run_dir) if path != final]
    # Newer ones belong to a future this run left (a resume that fell back past a corrupt one).
    stale = [path for n, path in others if n > step]
    older = [path for n, path in others if n < step]
    for path in stale + older[: -(KEEP - 1) or None]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _fsync_dir_files(folder: Path) -> None:
    """Flush the files to disk before the rename makes them the checkpoint of record."""
    for path in folder.iterdir():
        with path.open("rb") as fh:
            os.fsync(fh.fileno())


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [path for _, path in rf.checkpoint_folders(run_dir)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(folder: Path, rank: int, device: torch.device) -> dict[str, Any]:
    """Everything in a checkpoint folder, tensors on `device` (RNG states on CPU)."""
    state = json.loads((folder / "state.json").read_text())
    rng_file = folder / f"rng-rank{rank}.safetensors"
    if not rng_file.exists():  # resumed on fewer or more processes than it was saved from
        rng_file = folder / "rng-rank0.safetensors"
    return {
        "state": state,
        "model": load_file(str(folder / "model.safetensors"), device=str(device)),
        "optimizer": torch.load(folder / "optimizer.pt", map_location=device, weights_only=True),
        "rng": load_file(str(rng_file)),
    }


def load_latest_checkpoint(run_dir: str | Path, rank: int, device: torch.device) -> tuple[Path, dict[str, Any], list[str]] | None:
    """The newest checkpoint that loads, newest first; (folder, contents, why each newer one was
    skipped), or None when there is none."""
    skipped: list[str] = []
    for folder in reversed(list_checkpoints(run_dir)):
        try:
            return folder, load_checkpoint(folder, rank, device), skipped
        except Exception as e:  # noqa: BLE001 - a corrupt file of any kind: try the one before
            skipped.append(f"{folder.name}: {e.__class__.__name__}: {e}"[:300])
    if skipped:
        raise ValueError("no checkpoint of this run can be read: " + "; ".join(skipped))
    return None


def restore_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], method: Method) -> None:
    """Copy saved tensors into the model; the two sets of names must match exactly."""
    expected = checkpoint_tensors(model, method)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "the checkpoint does not fit this model and method "
            f"(missing: {', '.join(missing[:3]) or '-'}; unexpected: {', '.join(unexpected[:3]) or '-'})"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            expected[name].copy_(value)
