"""Instruction data: read a file, turn rows into conversations, tokenize them through the
model's chat template with loss only on the assistant replies (and their EOS).

Masking: each assistant turn is rendered twice through the template, once as the prompt
up to that turn (with the generation prompt) and once with the reply; the tokens between
the two renderings are the reply. They are trained up to and including the first EOS;
whatever the template puts after it (a newline) is masked, as are all prompt tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100

Message = dict[str, str]


class DataError(ValueError):
    """A problem with the user's data, naming file, row and field."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where no loss is taken."""
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, row {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, row {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return rows


def alpaca_to_messages(row: dict[str, Any], where: str, system_prompt: str | None = None) -> list[Message]:
    """{instruction, input?, output} -> [system?, user, assistant]."""
    for field in ("instruction", "output"):
        value = row.get(field)
        if value is None:
            raise DataError(f"{where}: missing field '{field}'")
        if not isinstance(value, str):
            raise DataError(f"{where}, field '{field}': expected text, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where}, field '{field}': empty")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}, field 'input': expected text, got {type(extra).__name__}")
    user = row["instruction"] if not extra.strip() else f"{row['instruction']}\n\n{extra}"
    messages: list[Message] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    return messages


def load_conversations(path: str | Path, system_prompt: str | None = None) -> list[list[Message]]:
    """Read an instruction file (JSONL, alpaca fields) into conversations."""
    rows = read_jsonl(path)
    return [alpaca_to_messages(row, f"{path}, row {i}", system_prompt) for i, row in enumerate(rows, start=1)]


def _render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer: Any, messages: list[Message], max_len: int) -> Example:
    """Token ids and labels of one conversation; every assistant turn is trained."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise DataError("the chat template does not render conversations incrementally; cannot mask prompts")
        prompt_ids = _encode(tokenizer, prompt[len(rendered) :])
        reply_ids = _encode(tokenizer, full[len(prompt) :])
        if eos in reply_ids:
            cut = reply_ids.index(eos) + 1
        else:  # the template closes turns without EOS: add it, or the model never learns to stop
            reply_ids = reply_ids + [eos]
            cut = len(reply_ids)
        ids += prompt_ids + reply_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + reply_ids[:cut] + [IGNORE_INDEX] * (len(reply_ids) - cut)
        rendered = full
    truncated = len(ids) > max_len
    return Example(ids[:max_len], labels[:max_len], truncated)


def tokenize_all(tokenizer: Any, conversations: list[list[Message]], max_len: int) -> list[Example]:
    examples = [tokenize_conversation(tokenizer, conv, max_len) for conv in conversations]
    kept = [e for e in examples if e.n_trained > 0]
    if not kept:
        raise DataError(f"no sample has a trained token within max_seq_len={max_len}; raise max_seq_len")
    return kept


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


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels, each (batch, longest)."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
