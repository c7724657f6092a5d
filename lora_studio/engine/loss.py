"""The training loss: summed next-token cross-entropy over the positions that carry a label."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lora_studio.data import IGNORE_INDEX, model_inputs
from lora_studio.engine.speed import (
    fp32_attention_on_cpu,
    linear_cross_entropy,
    packed_rows_hidden,
    trained_hidden_states,
)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the trained positions, and their count.

    The LM head runs only on positions that carry a label: with response-only masking
    that is a fraction of the batch, and the (tokens × vocab) logits are the largest
    activation of a small model.
    """
    labels = batch["labels"][:, 1:]  # (B, T-1): the target of position t is token t+1
    keep = labels != IGNORE_INDEX
    config = getattr(model, "config", None)
    post_processes_logits = any(
        getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    inputs = model_inputs(batch)  # packed batches: position ids instead of the 2D mask
    # fp32 attention: a no-op except under CPU bf16 autocast (see speed.py). Not with checkpointing:
    # the backward's recompute runs outside this block and must match the forward.
    checkpointing = getattr(getattr(model, "base_model", model), "gradient_checkpointing", False)
    with fp32_attention_on_cpu() if not checkpointing else contextlib.nullcontext():
        if post_processes_logits or not hasattr(model, "base_model") or model.base_model is model:
            logits = model(**inputs).logits
            logits = logits[:, :-1][keep]  # (N, V)
            loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
        else:
            if "position_ids" in inputs:
                body = model.base_model  # samples packed in rows: segments on a GPU (speed.py)
                hidden = packed_rows_hidden(body, inputs["input_ids"], inputs["position_ids"])[:, :-1][keep]  # (N, H)
            else:  # rows as a prefix tree: a prompt prefix they share runs once, no padding (speed.py)
                hidden = trained_hidden_states(model.base_model, batch["input_ids"], batch["attention_mask"], keep)
            # LM head and cross-entropy in chunks: never all (N, V) logits in fp32 at once.
            loss = linear_cross_entropy(hidden, model.get_output_embeddings(), labels[keep])
    return loss, int(keep.sum())


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Trained positions of a collated batch, counted as `causal_lm_loss` counts them."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class _SummedLoss(nn.Module):
    """`causal_lm_loss` as a module, so DistributedDataParallel's forward hooks see it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(self.model, batch)[0]
