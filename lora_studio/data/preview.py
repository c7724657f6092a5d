"""What the model will be trained on, before training: the first rows as a table, samples
rendered through the real chat template with the trained tokens marked, token-length
statistics and a histogram, and how many rows max_seq_len truncates.

`inspect_data` is the one call the UI makes after an upload; it never raises for bad data:
a file that cannot be read comes back as a report with its problem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_studio.data.problems import DataError
from lora_studio.data.sources import read_source
from lora_studio.data.tokenize import IGNORE_INDEX, Example
from lora_studio.data.validate import DataReport, check_lengths, load_samples

Span = tuple[str, bool]
"""(text, trained): a run of tokens that all carry loss, or all do not."""


def rows_frame(rows: list[dict[str, Any]], row_numbers: list[int] | None = None, n: int = 20):
    """The first n rows as a pandas DataFrame; a leading `row` column holds the numbers that
    problems refer to; lists and objects are shown as JSON text."""
    import pandas as pd

    def cell(value: Any) -> Any:
        if isinstance(value, (list, dict)):
            value = json.dumps(value, ensure_ascii=False)
        if isinstance(value, str):
            # Bytes that were not UTF-8 are lone surrogates (see sources.py), which pandas'
            # arrow strings and JSON cannot hold: shown as escapes (`caf\udce9`), the row kept.
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value

    numbers = row_numbers or list(range(1, len(rows) + 1))
    records = [
        {"row": number, **{cell(k): cell(v) for k, v in row.items()}} for number, row in zip(numbers[:n], rows[:n])
    ]
    return pd.DataFrame(records)


def sample_spans(tokenizer: Any, example: Example) -> list[Span]:
    """The example's tokens as runs of (text, trained), decoded with special tokens kept, so
    the EOS that ends each reply is visible (and marked trained)."""
    spans: list[Span] = []
    run: list[int] = []
    trained_run = False
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE_INDEX
        if run and trained != trained_run:
            spans.append((tokenizer.decode(run, skip_special_tokens=False), trained_run))
            run = []
        run.append(token)
        trained_run = trained
    if run:
        spans.append((tokenizer.decode(run, skip_special_tokens=False), trained_run))
    return spans


def spans_text(spans: list[Span], start: str = "[[", end: str = "]]") -> str:
    """Plain-text rendering for a terminal: trained text between start and end markers."""
    return "".join(f"{start}{text}{end}" if trained else text for text, trained in spans)


def length_stats(examples: list[Example], max_seq_len: int | None = None) -> dict[str, float]:
    """Token counts (before truncation), trained-token counts, and rows over max_seq_len."""
    import numpy as np

    if not examples:
        return {"n": 0}
    lengths = np.array([e.full_length if e.full_length is not None else len(e.input_ids) for e in examples])
    trained = np.array([e.n_trained for e in examples])
    stats = {
        "n": int(len(lengths)),
        "min": int(lengths.min()),
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p90": float(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
        "total_tokens": int(lengths.sum()),
        "trained_tokens": int(trained.sum()),
        "trained_fraction": float(trained.sum() / max(1, sum(len(e.input_ids) for e in examples))),
    }
    if max_seq_len is not None:
        stats["max_seq_len"] = max_seq_len
        stats["n_truncated"] = int((lengths > max_seq_len).sum())
    return stats


def length_histogram(examples: list[Example], bins: int = 20):
    """DataFrame(bin_start, bin_end, count) of token lengths before truncation (for a bar plot)."""
    import numpy as np
    import pandas as pd

    lengths = [e.full_length if e.full_length is not None else len(e.input_ids) for e in examples]
    if not lengths:
        return pd.DataFrame(columns=["bin_start", "bin_end", "count"])
    counts, edges = np.histogram(lengths, bins=bins)
    return pd.DataFrame({"bin_start": edges[:-1].round().astype(int), "bin_end": edges[1:].round().astype(int), "count": counts})


@dataclass
class DataPreview:
    """Everything the UI shows after an upload."""

    report: DataReport
    """Validation summary (report.summary(), report.problems_frame())."""
    rows: Any = None
    """pandas DataFrame of the first rows as read."""
    samples: list[list[Span]] = field(default_factory=list)
    """Rendered samples: runs of (text, trained) through the chat template."""
    sample_rows: list[int] = field(default_factory=list)
    """The row number of each rendered sample."""
    stats: dict[str, float] = field(default_factory=dict)
    """length_stats over all usable rows (empty without a tokenizer)."""
    histogram: Any = None
    """length_histogram DataFrame (None without a tokenizer)."""

    def text(self, n_samples: int | None = None) -> str:
        """What `python -m lora_studio inspect` prints."""
        out = [self.report.summary()]
        if self.stats.get("n"):
            s = self.stats
            out.append(
                f"tokens per row: min {s['min']}, median {s['median']:.0f}, mean {s['mean']:.1f}, p90 {s['p90']:.0f}, "
                f"max {s['max']}; trained tokens {s['trained_tokens']} of {s['total_tokens']} "
                f"({100 * s['trained_fraction']:.0f}%); {s.get('n_truncated', 0)} rows over max_seq_len={s.get('max_seq_len')}"
            )
        for row, spans in list(zip(self.sample_rows, self.samples))[:n_samples]:
            out.append(f"--- row {row} (trained text between [[ and ]]) ---\n{spans_text(spans)}")
        return "\n".join(out)


def inspect_data(
    source: str | Path,
    tokenizer: Any = None,
    *,
    fmt: str | None = None,
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    max_seq_len: int = 512,
    n_rows: int = 20,
    n_samples: int = 3,
    split: str | None = None,
    hub_config: str | None = None,
    name: str | None = None,
) -> DataPreview:
    """Validate a source and preview it; with a tokenizer, also render samples and measure
    lengths. Never raises DataError: unreadable data gives a report naming the problem."""
    shown = name or str(source)
    try:
        raw = read_source(source, split=split, config=hub_config, name=name)
        rows = rows_frame(raw.rows, raw.row_numbers, n_rows)
        samples, report = load_samples(raw, fmt=fmt, columns=columns, system_prompt=system_prompt)
    except DataError as e:
        return DataPreview(DataReport.from_error(e, shown))
    preview = DataPreview(report, rows)
    if tokenizer is None:
        return preview
    examples = [e for e in check_lengths(samples, tokenizer, max_seq_len, report) if e is not None]
    preview.stats = length_stats(examples, max_seq_len)
    preview.histogram = length_histogram(examples)
    for ex in examples[:n_samples]:
        preview.samples.append(sample_spans(tokenizer, ex))
        preview.sample_rows.append(ex.row)
    return preview
