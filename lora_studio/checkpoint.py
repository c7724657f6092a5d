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
ones deleted, so a crash or kill at any moment leaves the last good checkpoint readable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_studio import runfiles as rf
from lora_studio.methods import adapter_layers, trainable_parameters
from lora_studio.methods.base import Method

CHECKPOINTS = rf.CHECKPOINTS


def checkpoint_tensors(model: nn.Module, method: Method) -> dict[str, torch.Tensor]:
    """The model tensors that training changes: what a resume must restore."""
    tensors = dict(trainable_parameters(model))
    if method.after_step is not None:  # the rule may write the frozen base weight
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
        save_file(cpu, str(folder / "model.safetensors"), metadata={"step": str(step)})
        torch.save(optimizer_state, folder / "optimizer.pt")
        (folder / "state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2, sort_keys=True) + "\n")
        _fsync_dir_files(folder)
    except BaseException:  # disk full, read-only, killed: drop the half-written copy (frees space too)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    final = run_dir / CHECKPOINTS / f"step-{step:06d}"
    if final.exists():  # the same step saved again (stop right after a periodic save)
        shutil.rmtree(final)
    os.replace(folder, final)
    for older in list_checkpoints(run_dir):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
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
