"""Training data: from whatever file the user has to batches the model trains on.

    sources.py   read JSONL / JSON / CSV / TSV / Parquet files and Hub datasets
    formats.py   detect and convert alpaca, messages, ShareGPT, prompt/completion, text
    validate.py  every problem with file, row and field; drop bad rows or refuse
    tokenize.py  chat-template rendering with loss only on the replies (and their EOS)
    preview.py   first rows, rendered samples with trained tokens marked, length stats
    batching.py  length-grouped batches, packing without cross-sample attention, val split

For the engine: `build_datasets(cfg, tokenizer)`. For the UI: `inspect_data(...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_studio.data.batching import (
    check_packing,
    collate,
    length_grouped_batches,
    model_inputs,
    pack_examples,
    held_out_count,
    held_out_ids,
    split_examples,
)
from lora_studio.data.formats import FORMATS, Message, Sample, detect_format, parse_columns
from lora_studio.data.preview import (
    DataPreview,
    Span,
    inspect_data,
    length_histogram,
    length_stats,
    rows_frame,
    sample_spans,
    spans_text,
)
from lora_studio.data.problems import KINDS, DataError, Problem
from lora_studio.data.sources import RawData, read_source
from lora_studio.data.tokenize import (
    IGNORE_INDEX,
    Example,
    ensure_chat_template,
    tokenize_all,
    tokenize_conversation,
    tokenize_sample,
    tokenize_text,
)
from lora_studio.data.validate import DataReport, apply_policy, check_lengths, load_examples, load_samples, refusal


def load_conversations(
    path: str | Path,
    system_prompt: str | None = None,
    fmt: str | None = None,
    columns: dict[str, str] | None = None,
) -> list[list[Message]]:
    """Read a chat-shaped file into conversations; refuses (DataError listing every problem)
    if any row has an error."""
    samples, report = load_samples(path, fmt=fmt, columns=columns, system_prompt=system_prompt)
    if report.format == "text":
        raise DataError(f"{path}: format text holds no conversations; use load_examples")
    if report.errors:
        raise refusal(report)
    return [s.messages or [] for s in samples]


def build_datasets(cfg: Any, tokenizer: Any) -> tuple[list[Example], list[Example], DataReport]:
    """The engine's entry point: training and validation examples from a TrainConfig
    (data, val_data / val_fraction, format, columns, system_prompt, max_seq_len,
    drop_invalid, seed), and the report over both. Raises DataError when refused."""
    ensure_chat_template(tokenizer)
    common = dict(
        fmt=cfg.format,
        columns=parse_columns(cfg.columns),
        system_prompt=cfg.system_prompt,
        max_seq_len=cfg.max_seq_len,
        drop_invalid=cfg.drop_invalid,
    )
    train, report = load_examples(cfg.data, tokenizer, **common)
    if cfg.val_data:
        val, val_report = load_examples(cfg.val_data, tokenizer, **common)
        report = report.merged(val_report)
    else:
        train, val = split_examples(train, cfg.val_fraction, cfg.seed)
    report.n_train, report.n_val = len(train), len(val)
    return train, val, report


__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "KINDS",
    "DataError",
    "DataPreview",
    "DataReport",
    "Example",
    "Message",
    "Problem",
    "RawData",
    "Sample",
    "Span",
    "apply_policy",
    "build_datasets",
    "check_lengths",
    "check_packing",
    "collate",
    "detect_format",
    "ensure_chat_template",
    "inspect_data",
    "length_grouped_batches",
    "length_histogram",
    "length_stats",
    "load_conversations",
    "load_examples",
    "load_samples",
    "model_inputs",
    "pack_examples",
    "parse_columns",
    "read_source",
    "refusal",
    "rows_frame",
    "sample_spans",
    "spans_text",
    "held_out_count",
    "held_out_ids",
    "split_examples",
    "tokenize_all",
    "tokenize_conversation",
    "tokenize_sample",
    "tokenize_text",
]
