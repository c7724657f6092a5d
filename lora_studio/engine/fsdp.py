"""FSDP2 sharding for training past one device's memory: every rank holds 1/N of the weights.

`torch.distributed.fsdp.fully_shard` is applied to each decoder layer and then to a root
module, the frozen base included. Parameters become DTensors sharded on dim 0; a layer's
forward all-gathers its parameters, runs, and frees them again (backward likewise), and its
gradients are reduce-scattered, so the adapter's gradients and the optimizer's state (created
`zeros_like` a sharded parameter) are sharded too.

What the training loop needs, kept in this one module so it can be hooked into any loop:

  shard_model(root, decoder_layers, mp_dtype)   wrap instead of DistributedDataParallel
  full_norm(total_norm)                          clip_grad_norm_ returns a DTensor: its value
  gathered_trainable(model)                      context: trainable parameters whole on every
                                                 rank (for the PEFT adapter written by rank 0)
  save_sharded_checkpoint / load_sharded_checkpoint   torch.distributed.checkpoint, each rank
                                                 its own shard of adapter and optimizer state
  fsdp_refusal(method, cfg)                      why a run cannot be sharded, or None

Methods whose maths needs whole tensors outside a layer's forward (LoRA-Pro's solves, LoRA-FA's
projection, Delta-LoRA's base update) say why on their `Method.fsdp_note`; DoRA's column norm
runs inside the layer's forward, where FSDP has gathered the whole base weight; VeRA's shared
random matrices are buffers, which FSDP does not shard (each rank holds them whole).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

STRATEGIES = ("auto", "ddp", "fsdp")
"""Values of `TrainConfig.strategy`."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its `_no_split_modules` classes), in order.

    Falls back to the longest `nn.ModuleList` for models that do not name them.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if m.__class__.__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(root: nn.Module, layers: list[nn.Module], mp_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard each of `layers` and then `root` (which holds the rest: embeddings, final norm,
    LM head) over the default process group; returns `root`, now an FSDPModule.

    `root` must be the module whose forward the loop calls: its pre-forward hook gathers the
    parameters no layer owns. `mp_dtype` (bf16/fp16) is the dtype parameters are gathered and
    computed in; gradients are still reduced and the sharded parameters kept in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32 if mp_dtype else None)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(root, mp_policy=policy)
    return root


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """`clip_grad_norm_` over DTensor gradients returns a (replicated) DTensor: its plain value."""
    return norm.full_tensor() if is_sharded(norm) else norm


@contextlib.contextmanager
def gathered_trainable(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every trainable parameter of `model` is a whole, plain tensor on every
    rank (all ranks must enter: each gather is a collective), so code written for one process
    (`save_adapter`, an export) reads the adapter as a single-process run would. The sharded
    parameters are put back on exit; the adapter is small, so gathering it whole is cheap."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.requires_grad and is_sharded(p):
                    full = nn.Parameter(p.detach().full_tensor(), requires_grad=True)  # collective
                    module._parameters[name] = full
                    swapped.append((module, name, p))
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # The frozen base is reloaded from the model files: only what training changes is saved.
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_sd, "optimizer": optim_sd}


def save_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shard of the trainable tensors and optimizer state into `folder`
    (`__R_0.distcp` per rank, `.metadata` by rank 0). All ranks must call; `folder` must be on
    storage every rank sees."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    # Never a checkpoint with NaN or inf weights (as for whole ones): every rank checks its shard.
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(_local(p)).all())]
    flag = torch.tensor([float(len(bad))], device=_local(next(model.parameters())).device)
    if dist.is_initialized():
        dist.all_reduce(flag)
    if flag.item():
        first = f" (first: {bad[0]})" if bad else ""
        raise ValueError(f"not writing the checkpoint: adapter tensors hold NaN or inf{first}; training diverged. "
                         "Lower the learning rate and train again")
    dcp.save(_state(model, optimizer), checkpoint_id=str(folder))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t


def has_sharded_checkpoint(folder: Path) -> bool:
    return (folder / ".metadata").exists()


def load_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load what `save_sharded_checkpoint` wrote into the sharded model and optimizer (all ranks).
    The world size may differ from the saving run's: DCP reshards on load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )


def fsdp_refusal(method: Any, cfg: Any) -> str | None:
    """Why this run cannot use `--strategy fsdp` (None: it can), naming what to pick instead."""
    note = getattr(method, "fsdp_note", None)
    note = note(cfg) if callable(note) else note
    if note:
        return f"{method.title} cannot train with --strategy fsdp: {note}; use --strategy ddp"
    if getattr(cfg, "quantize", None) == "4bit":
        return (
            "a 4-bit base cannot be sharded with --strategy fsdp (bitsandbytes' packed NF4 weights are not "
            "tensors FSDP2 can split); 4-bit runs use --strategy ddp, where the base already takes a quarter"
        )
    if getattr(cfg, "merge", False):
        return "--merge needs the whole base on one process; with --strategy fsdp save the adapter and merge it with `export`"
    if getattr(cfg, "precision", None) == "fp16":
        return "fp16 needs a gradient scaler that FSDP2's sharded gradients do not support here; use --precision bf16"
    if getattr(cfg, "compile", False) is True:  # (`auto` stays eager on several processes)
        return "--compile is not wired for sharded models yet; drop --compile"
    if getattr(cfg, "probes", None) or getattr(cfg, "early_stop", 0):
        # rank 0 generates alone, and a sharded forward needs every rank's all-gather
        return "probe prompts and early stopping generate on one process, which a sharded model cannot; use --strategy ddp"
    return None
