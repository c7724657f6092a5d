"""Validation before any training: every problem of every row, in one report.

    load_samples     read + detect/convert the format; row problems, duplicates
    check_lengths    tokenize; rows truncated at max_seq_len, rows with nothing to train
    apply_policy     drop the rows with errors (and duplicates), counting them, or refuse
    load_examples    the three in a row, for training

Problems of the whole file (not found, empty, unknown format) raise `DataError` at once;
row problems are collected, so the user fixes the file in one pass instead of one error
per run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_studio.data.formats import Sample, convert_row, resolve_format
from lora_studio.data.problems import ERROR, KINDS, WARNING, DataError, Problem, fatal
from lora_studio.data.sources import RawData, read_source
from lora_studio.data.tokenize import Example, tokenize_samples

MAX_LISTED = 20


@dataclass
class DataReport:
    """What validation found, for the UI to show and the run folder to keep."""

    files: list[str]
    """The sources read (training file first, then a validation file if any)."""
    format: str | None
    """The row format used (alpaca, messages, sharegpt, prompt-completion, text)."""
    format_detected: bool = True
    """False when the user named the format."""
    n_rows: int = 0
    """Records in the sources, readable or not."""
    problems: list[Problem] = field(default_factory=list)
    """Every problem, errors and warnings, in file order."""
    max_seq_len: int | None = None
    """The length rows were checked against (None: not tokenized)."""
    n_truncated: int = 0
    """Usable rows longer than max_seq_len (cut at the end)."""
    n_dropped: int = 0
    """Rows left out by `apply_policy` (errors, and duplicates when dropping)."""
    n_train: int = 0
    """Examples going into training."""
    n_val: int = 0
    """Examples held out for the eval loss."""
    refused: bool = False
    """True when the run was refused because of row errors."""

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def error_rows(self) -> set[tuple[str, int | None]]:
        """(file, row) of every row that cannot be trained on."""
        return {(p.file, p.row) for p in self.errors}

    @property
    def duplicate_rows(self) -> set[tuple[str, int | None]]:
        return {(p.file, p.row) for p in self.problems if p.kind == "duplicate"}

    @property
    def n_usable(self) -> int:
        """Rows that can be trained on as they are (0 for a file refused as a whole)."""
        return max(0, self.n_rows - len(self.error_rows))

    @property
    def ok(self) -> bool:
        """No errors: the data can be trained on without dropping anything."""
        return not self.errors

    def counts(self) -> dict[str, int]:
        """Problems per kind."""
        return dict(Counter(p.kind for p in self.problems))

    def summary(self, max_listed: int = MAX_LISTED) -> str:
        """A few lines of plain text: the headline, then the problems (errors first)."""
        fmt = f"format {self.format} ({'detected' if self.format_detected else 'as given'})" if self.format else "format unknown"
        lines = [f"{' + '.join(self.files)}: {self.n_rows} rows, {fmt}"]
        parts = [f"{self.n_usable} rows usable"]
        if self.error_rows:
            parts.append(f"{len(self.error_rows)} with errors")
        if self.duplicate_rows:
            parts.append(f"{len(self.duplicate_rows)} duplicates")
        if self.max_seq_len is not None:
            parts.append(f"{self.n_truncated} truncated at max_seq_len={self.max_seq_len}")
        if self.n_dropped:
            parts.append(f"{self.n_dropped} dropped")
        if self.n_train or self.n_val:
            parts.append(f"{self.n_train} train / {self.n_val} validation")
        lines.append("; ".join(parts))
        if self.problems:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.counts().items()))
            lines.append(f"problems: {len(self.errors)} errors, {len(self.warnings)} warnings ({kinds})")
            ordered = self.errors + self.warnings
            lines += [f"  {p.severity}: {p}" for p in ordered[:max_listed]]
            if len(ordered) > max_listed:
                lines.append(f"  ... and {len(ordered) - max_listed} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "format": self.format,
            "format_detected": self.format_detected,
            "n_rows": self.n_rows,
            "n_usable": self.n_usable,
            "n_error_rows": len(self.error_rows),
            "n_duplicates": len(self.duplicate_rows),
            "max_seq_len": self.max_seq_len,
            "n_truncated": self.n_truncated,
            "n_dropped": self.n_dropped,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "refused": self.refused,
            "ok": self.ok,
            "counts": self.counts(),
            "problems": [p.to_dict() for p in self.problems],
        }

    def problems_frame(self):
        """A pandas DataFrame of the problems: file, row, field, kind, severity, message."""
        import pandas as pd

        columns = ["file", "row", "field", "kind", "severity", "message"]
        frame = pd.DataFrame([p.to_dict() for p in self.problems], columns=columns)
        frame["row"] = frame["row"].astype("Int64")  # nullable: file-level problems have no row
        return frame

    def merged(self, other: "DataReport") -> "DataReport":
        """One report over two sources (training file + validation file)."""
        return DataReport(
            files=self.files + other.files,
            format=self.format,
            format_detected=self.format_detected,
            n_rows=self.n_rows + other.n_rows,
            problems=self.problems + other.problems,
            max_seq_len=self.max_seq_len,
            n_truncated=self.n_truncated + other.n_truncated,
            n_dropped=self.n_dropped + other.n_dropped,
            n_train=self.n_train,
            n_val=self.n_val + other.n_train,
            refused=self.refused or other.refused,
        )

    @classmethod
    def from_error(cls, error: DataError, file: str) -> "DataReport":
        """A report for data that could not be read at all (the UI shows it like any other)."""
        return cls(files=[file], format=None, problems=list(error.problems) or [Problem(file, None, None, "unreadable", str(error))])


def load_samples(
    source: str | Path | RawData,
    *,
    fmt: str | None = None,
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    split: str | None = None,
    hub_config: str | None = None,
    name: str | None = None,
) -> tuple[list[Sample], DataReport]:
    """Read a source (or take rows already read) and convert its rows; the report holds
    every row problem found.
    Raises DataError for the file as a whole (not found, empty, unknown format)."""
    raw = source if isinstance(source, RawData) else read_source(source, split=split, config=hub_config, name=name)
    if raw.n_rows == 0:
        raise fatal(raw.source, "empty_file", "the file holds no rows")
    if not raw.rows:
        listed = "; ".join(str(p) for p in raw.problems[:5])
        raise DataError(f"{raw.source}: no row could be read ({listed})", raw.problems)
    resolved = resolve_format(raw, fmt, columns)
    problems: list[Problem] = list(raw.problems)
    samples: list[Sample] = []
    for row, number in zip(raw.rows, raw.row_numbers):
        sample, found = convert_row(row, resolved, raw.source, number, columns, system_prompt)
        problems += found
        if sample is not None:
            samples.append(sample)
    first_seen: dict[str, int] = {}
    for s in samples:
        key = s.key()
        if key in first_seen:
            problems.append(Problem(s.file, s.row, None, "duplicate", f"repeats row {first_seen[key]}", WARNING))
        else:
            first_seen[key] = s.row
    problems.sort(key=lambda p: (p.row or 0))
    report = DataReport([raw.source], resolved, fmt in (None, "", "auto"), raw.n_rows, problems)
    return samples, report


def check_lengths(
    samples: list[Sample], tokenizer: Any, max_seq_len: int, report: DataReport
) -> list[Example | None]:
    """Tokenize the samples (None where the row cannot be trained), adding length and
    template problems to the report."""
    examples, problems = tokenize_samples(tokenizer, samples, max_seq_len)
    report.problems = sorted(report.problems + problems, key=lambda p: (p.file != report.files[0], p.row or 0))
    report.max_seq_len = max_seq_len
    report.n_truncated = sum(1 for e in examples if e is not None and e.truncated)
    return examples


def refusal(report: DataReport) -> DataError:
    """The DataError that refuses the data: every error listed, the report attached."""
    report.refused = True
    listed = [f"  {p}" for p in report.errors[:MAX_LISTED]]
    if len(report.errors) > MAX_LISTED:
        listed.append(f"  ... and {len(report.errors) - MAX_LISTED} more")
    return DataError(
        f"{' + '.join(report.files)}: {len(report.error_rows)} of {report.n_rows} rows cannot be trained on; "
        "fix them, or drop them (drop_invalid / --drop-invalid):\n" + "\n".join(listed),
        report.errors,
        report,
    )


def apply_policy(examples: list[Example | None], report: DataReport, drop_invalid: bool) -> list[Example]:
    """Drop the rows with errors (and repeated rows) and count them, or refuse the data
    (`refusal`)."""
    if report.errors and not drop_invalid:
        raise refusal(report)
    dropped = report.error_rows | (report.duplicate_rows if drop_invalid else set())
    kept = [e for e in examples if e is not None and (e.file, e.row) not in dropped]
    report.n_dropped = report.n_rows - len(kept)
    if not kept:
        raise DataError(f"{' + '.join(report.files)}: no row is left to train on", report.errors, report)
    return kept


def load_examples(
    source: str | Path,
    tokenizer: Any,
    *,
    fmt: str | None = None,
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    max_seq_len: int = 512,
    drop_invalid: bool = False,
    split: str | None = None,
    hub_config: str | None = None,
    name: str | None = None,
) -> tuple[list[Example], DataReport]:
    """Source -> trainable examples and the report (raises DataError when refused)."""
    samples, report = load_samples(
        source, fmt=fmt, columns=columns, system_prompt=system_prompt, split=split, hub_config=hub_config, name=name
    )
    examples = check_lengths(samples, tokenizer, max_seq_len, report)
    kept = apply_policy(examples, report, drop_invalid)
    report.n_train = len(kept)
    return kept, report


__all__ = ["DataReport", "KINDS", "load_samples", "check_lengths", "apply_policy", "refusal", "load_examples"]
