"""Score a run by generation: greedy replies of the base (adapter off) and the tuned model
(adapter on) to every row's prompt, each scored against the row's reference (lora_studio.scoring).

One model in memory (`TunedModel`), prompts generated in batches (left-padded, so every row's
reply starts right after its own prompt). No gradio here: the CLI, the bake-off and the Compare
tab call `evaluate_run`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_studio.compare import GenerationSettings, TunedModel, generation_kwargs, prompt_text
from lora_studio.data import DataError
from lora_studio.methods import disable_adapter
from lora_studio.runfiles import write_json_atomic
from lora_studio.scoring import mean_scores, score

def reference_rows(source: str | Path, fmt: str | None = None, columns: dict[str, str] | None = None) -> list[dict[str, str]]:
    """{"prompt", "reference"} per row of a data file in any training format: the first user
    turn and the reply that follows it. Rows without one are refused, naming file and row."""
    from lora_studio.data import load_samples, parse_columns

    samples, report = load_samples(source, fmt=fmt, columns=parse_columns(columns), system_prompt=None)
    if report.errors:  # a bad reference row would silently score 0: refuse it, named
        raise DataError(str(report.errors[0]), report.errors)
    out = []
    for sample in samples:
        turns = [m for m in sample.messages or [] if m["role"] != "system"]
        if len(turns) < 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
            raise DataError(f"{sample.file}, row {sample.row}: no user prompt followed by a reference reply")
        out.append({"prompt": turns[0]["content"], "reference": turns[1]["content"]})
    if not out:
        raise DataError(f"{source}: no rows to score")
    return out


@torch.no_grad()
def generate_replies(
    model: nn.Module, tokenizer: Any, prompts: list[str], settings: GenerationSettings,
    system_prompt: str | None = None, batch_size: int = 8,
) -> list[str]:
    """Replies to `prompts` (in their order), `batch_size` at a time, greedy unless the settings
    sample. Batches are cut from the prompts sorted by length, so little padding is generated."""
    device = next(model.parameters()).device
    texts = [prompt_text(tokenizer, [{"role": "user", "content": p}], system_prompt) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    replies: list[str] = [""] * len(texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: pads must sit before the prompt
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in chunk], add_special_tokens=False, padding=True, return_tensors="pt")
            ids = enc["input_ids"].to(device)  # (B, T)
            kwargs = generation_kwargs(tokenizer, settings, enc["attention_mask"].to(device))
            out = model.generate(ids, **kwargs)  # (B, T + new)
            for row, i in enumerate(chunk):
                replies[i] = tokenizer.decode(out[row, ids.shape[1] :], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return replies


def evaluate_model(
    tm: TunedModel, rows: list[dict[str, str]], settings: GenerationSettings | None = None,
    batch_size: int = 8, with_base: bool = True,
) -> list[dict[str, Any]]:
    """Per row: prompt, reference, base and tuned replies and their scores."""
    settings = settings or tm.generation
    prompts = [r["prompt"] for r in rows]
    gen = dict(tokenizer=tm.tokenizer, prompts=prompts, settings=settings, system_prompt=tm.system_prompt, batch_size=batch_size)
    tuned = generate_replies(tm.model, **gen)
    base: list[str | None] = [None] * len(rows)
    if with_base:
        with disable_adapter(tm.model):
            base = list(generate_replies(tm.model, **gen))
    out = []
    for row, t, b in zip(rows, tuned, base):
        item: dict[str, Any] = {**row, "tuned": t, "tuned_scores": score(t, row["reference"])}
        if b is not None:
            item.update(base=b, base_scores=score(b, row["reference"]))
        out.append(item)
    return out


def summarize(scored: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"n": len(scored), "tuned": mean_scores(r["tuned_scores"] for r in scored)}
    if scored and "base_scores" in scored[0]:
        summary["base"] = mean_scores(r["base_scores"] for r in scored)
    return summary


def replies_path(out: str | Path) -> Path:
    """Where the per-row replies go: beside the summary, same name, .jsonl."""
    return Path(out).with_suffix(".jsonl")


def evaluate_run(
    run_dir: str | Path, rows: list[dict[str, str]], out: str | Path, max_new_tokens: int | None = None,
    batch_size: int = 8, with_base: bool = True, model: TunedModel | None = None,
) -> dict[str, Any]:
    """Score a run on `rows`; write the replies (JSONL) and the summary (JSON at `out`)."""
    tm = model or TunedModel(run_dir)
    settings = dataclasses.replace(tm.generation, temperature=0.0)  # scores are of greedy replies
    if max_new_tokens is not None:
        settings.max_new_tokens = max_new_tokens
    scored = evaluate_model(tm, rows, settings, batch_size=batch_size, with_base=with_base)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    replies = replies_path(out)
    replies.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored), encoding="utf-8")
    summary = {"run": str(run_dir), **summarize(scored), "max_new_tokens": settings.max_new_tokens, "replies": str(replies)}
    write_json_atomic(out, summary)
    return summary
