"""Batches: length-grouped padding, or packing several samples into one row without letting
them attend to each other; and the train/validation split.

Packing uses transformers' own packed-sequence path: position ids that restart at 0 at
each sample, no 2D attention mask and no KV cache. From those, `create_causal_mask`
(transformers 5.23, masking_utils.find_packed_sequence_indices) builds a block-diagonal
causal mask for sdpa and eager attention, and flash-attention uses varlen kernels. The
path is silently skipped when a 2D mask is passed or a cache is created (`use_cache`
defaults to True in most configs), so `model_inputs` leaves both out, and `check_packing`
verifies on the loaded model, once, that packed rows give the same logits as separate
ones before any training step relies on it.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from lora_studio.data.problems import DataError
from lora_studio.data.tokenize import IGNORE_INDEX, Example


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches so each batch holds similar lengths
    (little padding), and shuffle the batch order so long batches are not all at the end."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def pack_examples(examples: list[Example], max_len: int) -> list[Example]:
    """First-fit decreasing: each returned example holds whole samples, at most max_len
    tokens, with `position_ids` restarting at every sample. The first label of each sample
    is masked: in a packed row it would be predicted from the previous sample's last token."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(ex.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([ex])
            room.append(max_len - n)
        else:
            bins[slot].append(ex)
            room[slot] -= n
    packed = []
    for parts in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for ex in parts:
            ids += ex.input_ids
            labels += [IGNORE_INDEX] + ex.labels[1:]
            positions += range(len(ex.input_ids))
        packed.append(
            Example(ids, labels, any(e.truncated for e in parts), len(ids), parts[0].file, parts[0].row, positions)
        )
    return packed


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask (1 on real tokens), labels, each
    (batch, longest); plus position_ids (batch, longest) when the examples are packed, the
    padding restarting at 0 so it forms a segment of its own that no sample attends to."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    positions = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(e.position_ids if e.position_ids is not None else range(n))
            positions[row, n:] = torch.arange(longest - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments for the model's forward. A packed batch gives position ids and
    neither the 2D mask nor a cache, so transformers builds the block-diagonal mask."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


@torch.no_grad()
def check_packing(model: nn.Module, atol: float = 1e-4) -> None:
    """Run two short random samples packed in one row and one by one; raise ValueError
    if the logits differ, i.e. the model's attention lets packed samples see each other."""
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=gen).to(device) for n in (5, 7))
    was_training = model.training
    model.eval()
    try:
        alone = [model(**model_inputs({"input_ids": x, "attention_mask": torch.ones_like(x)})).logits for x in (first, second)]
        samples = [Example(x[0].tolist(), x[0].tolist()) for x in (first, second)]
        row = collate(pack_examples(samples, 12), 0)
        order = row["position_ids"][0].tolist()  # the longer sample is packed first
        together = model(**model_inputs({k: v.to(device) for k, v in row.items()})).logits
    finally:
        model.train(was_training)
    expected = torch.cat(alone[::-1] if order[7] == 0 else alone, dim=1)  # (1, 12, V)
    if not torch.allclose(together.float(), expected.float(), atol=atol, rtol=1e-3):
        impl = getattr(getattr(model, "config", None), "_attn_implementation", "?")
        raise ValueError(
            f"packing is not supported by this model (attention {impl!r}): packed samples would attend "
            "to each other; train without packing"
        )


def held_out_count(rows: int, fraction: float) -> int:
    """How many of `rows` usable rows are held out for validation: round(fraction · rows), at
    least 1 and at least 1 left (none when there is no fraction or too few rows to split: the
    split itself then says what is wrong). The one split rule: the run, the preflight and the
    benchmark all count with it."""
    if not fraction or fraction <= 0 or rows < 2:
        return 0
    return min(rows - 1, max(1, round(fraction * rows)))


def held_out_ids(rows: int, fraction: float, seed: int) -> set[int]:
    """Which of `rows` rows (0-based) are held out: `held_out_count` of them, drawn with `seed`."""
    return set(random.Random(seed).sample(range(rows), held_out_count(rows, fraction)))


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of the examples (at least one, and at least one left to train),
    chosen with `seed`; both parts keep the file order."""
    if fraction <= 0:
        return list(examples), []
    if len(examples) < 2:
        raise DataError(f"val_fraction={fraction} needs at least 2 usable rows; there is {len(examples)}")
    chosen = held_out_ids(len(examples), fraction, seed)
    train = [e for i, e in enumerate(examples) if i not in chosen]
    val = [e for i, e in enumerate(examples) if i in chosen]
    return train, val
