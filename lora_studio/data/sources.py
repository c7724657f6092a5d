"""Reading rows from wherever the user's data lives: a local or uploaded file (JSONL, JSON,
CSV, TSV, Parquet) or a Hub dataset (`owner/name`, with an optional config and split).

Parsing is left to libraries (the json and csv modules, pyarrow, `datasets`); this module
only decides which one to call, numbers the rows the way the user sees them, and turns
their failures into `DataError`s that name the file.

Row numbers: JSONL -> the line number; CSV/TSV -> the spreadsheet row (the header is row 1,
the first record row 2); JSON, Parquet and Hub data -> the 1-based record number.

Text is decoded with `surrogateescape`, so bytes that are not UTF-8 survive as lone
surrogates and validation can name the exact row and field that holds them instead of
refusing the whole file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_studio.data.problems import DataError, Problem, fatal

SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}

# owner/name, optionally :config and @split (neither ':' nor '@' can appear in a Hub repo id)
HUB_SPEC = re.compile(r"^(?:hf://datasets/|hub:)?(?P<name>[\w.-]+(?:/[\w.-]+)?)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.\[\]:%-]+))?$")


@dataclass
class RawData:
    """The rows of one source, before any format is applied."""

    source: str
    """Name used in messages (the file path as given, or the Hub dataset id)."""
    kind: str
    """jsonl, json, csv, tsv, parquet or hub."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """The records that could be read, as plain Python values."""
    row_numbers: list[int] = field(default_factory=list)
    """Where each record lies in the source (see the module docstring)."""
    problems: list[Problem] = field(default_factory=list)
    """Records that could not be read at all (a JSONL line that is not JSON, ...)."""

    @property
    def columns(self) -> list[str]:
        """Every key seen, in order of first appearance."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for key in row:
                seen.setdefault(key, None)
        return list(seen)

    @property
    def n_rows(self) -> int:
        """Records in the source, readable or not."""
        return len(self.rows) + len(self.problems)


def parse_hub_spec(spec: str) -> tuple[str, str | None, str] | None:
    """`owner/name[:config][@split]` -> (name, config, split); None if it is not such a name."""
    m = HUB_SPEC.match(spec.strip())
    if not m or Path(spec).suffix.lower() in SUFFIXES:
        return None
    return m["name"], m["config"], m["split"] or "train"


def read_source(
    source: str | Path,
    *,
    split: str | None = None,
    config: str | None = None,
    name: str | None = None,
) -> RawData:
    """Read a local file, or a Hub dataset when `source` is not a file but looks like
    `owner/name[:config][@split]`. `split`/`config` override those in the spec; `name`
    replaces the path in messages (an uploaded file's temporary path means nothing to
    the user)."""
    spec = str(source)
    path = Path(spec)
    shown = name or spec
    if not spec.strip():
        raise fatal("(no file)", "unreadable", "no data file given")
    if path.exists():
        if path.is_dir():
            raise fatal(shown, "unreadable", "is a folder; give a JSONL, JSON, CSV, TSV or Parquet file")
        return read_file(path, shown)
    hub = parse_hub_spec(spec)
    if hub is None:
        raise fatal(shown, "unreadable", "file not found")
    hub_name, hub_config, hub_split = hub
    try:
        return read_hub(hub_name, config or hub_config, split or hub_split, name)
    except DataError as e:  # say both: the user may have meant a local file
        problem = e.problems[0]
        raise fatal(problem.file, problem.kind, "no such local file, and " + problem.message) from None


def _kind(path: Path, head: bytes) -> str | None:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is not None:
        return kind
    start = head.lstrip()[:1]
    return {b"{": "jsonl", b"[": "json"}.get(start)


def _decode(data: bytes, shown: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise fatal(shown, "unreadable", "the file is UTF-16 text; save it as UTF-8")
    return data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")


MAX_MB_ENV = "LORA_STUDIO_MAX_UPLOAD_MB"
DEFAULT_MAX_MB = 200.0
# Leading bytes of binary formats people upload by mistake (a zipped export, a spreadsheet).
_MAGIC = {
    b"PK\x03\x04": "a zip archive (or an .xlsx/.docx file)",
    b"\x1f\x8b": "a gzip archive",
    b"PAR1": "a Parquet file",
    b"\x89PNG": "a PNG image",
    b"%PDF": "a PDF document",
    b"\xd0\xcf\x11\xe0": "an old Office document",
    b"7z\xbc\xaf": "a 7z archive",
    b"\x7fELF": "a program",
}


def max_file_mb() -> float:
    """The data file size limit in MB ($LORA_STUDIO_MAX_UPLOAD_MB, default 200; 0 = none)."""
    try:
        return float(os.environ.get(MAX_MB_ENV) or DEFAULT_MAX_MB)
    except ValueError:
        return DEFAULT_MAX_MB


def _sniff_binary(head: bytes, kind: str, shown: str) -> None:
    """Refuse a text-format file whose bytes are a binary format (checked before parsing)."""
    for magic, what in _MAGIC.items():
        if head.startswith(magic) and not (kind == "parquet" and magic == b"PAR1"):
            raise fatal(shown, "unreadable", f"the file is {what}, not {kind.upper()} text")
    if kind != "parquet" and b"\x00" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise fatal(shown, "unreadable", f"the file holds binary data (NUL bytes), not {kind.upper()} text")


def read_file(path: Path, shown: str | None = None) -> RawData:
    shown = shown or str(path)
    limit = max_file_mb()
    size = path.stat().st_size
    if limit > 0 and size > limit * 1024 * 1024:  # checked before a byte is read
        raise fatal(shown, "unreadable", f"the file is {size / 2**20:.0f} MB, over the {limit:g} MB limit ({MAX_MB_ENV})")
    with path.open("rb") as fh:
        head = fh.read(8192)
    kind = _kind(path, head[:64])
    if kind is None:
        raise fatal(shown, "unreadable", f"unsupported file type '{path.suffix}': use JSONL, JSON, CSV, TSV or Parquet")
    _sniff_binary(head, kind, shown)
    data = path.read_bytes()
    if kind == "parquet":
        return _read_parquet(path, shown)
    if kind in ("csv", "tsv"):
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise fatal(shown, "unreadable", "the file is UTF-16 text; save it as UTF-8")
        return _read_csv(path, shown, "\t" if kind == "tsv" else ",")
    text = _decode(data, shown)
    if not text.strip():
        raise fatal(shown, "empty_file", "the file is empty")
    first = text.lstrip()[:1]
    # Trust the content over the name: `.jsonl` files that hold one array and `.json`
    # files that hold one object per line are both common.
    if first == "[" or (kind == "json" and not _looks_like_jsonl(text)):
        return _read_json(text, shown)
    return _read_jsonl(text, shown)


def _looks_like_jsonl(text: str) -> bool:
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) < 2:
        return False
    try:
        return isinstance(json.loads(lines[0]), dict)
    except json.JSONDecodeError:
        return False


def _read_jsonl(text: str, shown: str) -> RawData:
    raw = RawData(shown, "jsonl")
    # split("\n"), not splitlines(): the latter also breaks at U+2028 and friends, which
    # JSON allows unescaped inside strings, and would shift every later line number.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raw.problems.append(Problem(shown, lineno, None, "invalid_json", f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        except RecursionError:
            raw.problems.append(Problem(shown, lineno, None, "invalid_json", "JSON nested too deeply"))
            continue
        if not isinstance(row, dict):
            raw.problems.append(
                Problem(shown, lineno, None, "not_an_object", f"expected a JSON object, got {_json_type(row)}")
            )
            continue
        raw.rows.append(row)
        raw.row_numbers.append(lineno)
    return raw


def _read_json(text: str, shown: str) -> RawData:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise fatal(shown, "unreadable", f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise fatal(shown, "unreadable", "the JSON is nested too deeply to be training data") from None
    records = _records(doc)
    if records is None:
        raise fatal(
            shown,
            "unreadable",
            f"expected an array of objects (or {{\"data\": [...]}}, or columns of equal-length lists), got {_json_type(doc)}",
        )
    raw = RawData(shown, "json")
    for i, row in enumerate(records, start=1):
        if isinstance(row, dict):
            raw.rows.append(row)
            raw.row_numbers.append(i)
        else:
            raw.problems.append(Problem(shown, i, None, "not_an_object", f"expected a JSON object, got {_json_type(row)}"))
    return raw


def _records(doc: Any) -> list[Any] | None:
    """The list of records a JSON document holds: an array; a single conversation object;
    an object wrapping one array of objects ({"data": [...]}); or pandas' column
    orientation ({"col": [v1, v2], ...})."""
    if isinstance(doc, list):
        return doc
    if not isinstance(doc, dict) or not doc:
        return None
    lists = {k: v for k, v in doc.items() if isinstance(v, list)}
    if set(doc) & {"messages", "conversations"}:
        return [doc]  # one conversation, not a wrapper around records
    if len(doc) == 1 and lists and all(isinstance(r, dict) for r in next(iter(lists.values()))):
        return next(iter(lists.values()))
    if len(lists) == len(doc) and len({len(v) for v in lists.values()}) == 1:
        keys = list(lists)
        return [dict(zip(keys, values)) for values in zip(*lists.values())]
    return None


def _read_csv(path: Path, shown: str, sep: str) -> RawData:
    # The csv module, not pandas: pandas keeps the first values of a row that has more than the
    # header and drops the rest with only a warning (or refuses the whole file); here such a row
    # is a problem that names it. Cells stay text ("" and "NA" too); undecodable bytes survive as
    # lone surrogates for validation to name.
    import csv

    label = "TSV" if sep == "\t" else "CSV"
    raw = RawData(shown, label.lower())
    csv.field_size_limit(2**31 - 1)  # huge cells are the size limit's business, not csv's
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        reader = csv.reader(fh, delimiter=sep, strict=True)
        try:
            header = next(reader, None)
            while header == []:  # blank lines before the header
                header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise fatal(shown, "empty_file", "the file is empty")
            columns = _column_names(header)
            record = 1  # spreadsheet rows: the header is row 1
            for values in reader:
                if not values:  # a blank line
                    continue
                record += 1
                if len(values) > len(columns):
                    raw.problems.append(Problem(
                        shown, record, None, "extra_fields",
                        f"{len(values)} values, but the header has {len(columns)} columns: the extra "
                        "values would be lost (quote a cell that holds the separator)",
                    ))
                    continue
                # A short row: the missing cells are absent (null), which validation names.
                raw.rows.append(dict(zip(columns, values)) | {c: None for c in columns[len(values):]})
                raw.row_numbers.append(record)
        except csv.Error as e:
            raise fatal(shown, "unreadable", f"not valid {label} (line {reader.line_num}: {e})") from None
    return raw


def _column_names(header: list[str]) -> list[str]:
    """Header cells stripped; an empty one named by its position, a repeated one suffixed (.1, .2)."""
    names: list[str] = []
    for i, cell in enumerate(header):
        name = cell.strip() or f"column {i + 1}"
        base, n = name, 0
        while name in names:
            n += 1
            name = f"{base}.{n}"
        names.append(name)
    return names


def _read_parquet(path: Path, shown: str) -> RawData:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise fatal(shown, "unreadable", f"not a readable Parquet file ({e})") from None
    return RawData(shown, "parquet", rows, list(range(1, len(rows) + 1)))


HUB_ROWS_ENV, HUB_MB_ENV = "LORA_STUDIO_MAX_HUB_ROWS", "LORA_STUDIO_MAX_HUB_MB"
DEFAULT_HUB_ROWS, DEFAULT_HUB_MB = 100_000, 200.0
_SLICE = re.compile(r"^([\w.-]+)\[:(\d+)\]$")


def hub_caps() -> tuple[int, float] | None:
    """(rows, MB) read at most from a Hub dataset: in public mode (LORA_STUDIO_MODE=public) only,
    from LORA_STUDIO_MAX_HUB_ROWS / LORA_STUDIO_MAX_HUB_MB (0: no cap); None elsewhere."""
    if os.environ.get("LORA_STUDIO_MODE", "").strip().lower() != "public":
        return None

    def number(name: str, default: float) -> float:
        try:
            return float(os.environ.get(name) or default)
        except ValueError:
            return default

    return int(number(HUB_ROWS_ENV, DEFAULT_HUB_ROWS)), number(HUB_MB_ENV, DEFAULT_HUB_MB)


def read_hub(name: str, config: str | None = None, split: str = "train", shown: str | None = None) -> RawData:
    """A Hub dataset through `datasets.load_dataset(name, config, split=split)`. In public mode
    it is streamed, with no token, and refused past the row and byte caps (`hub_caps`), before
    it can fill the server's disk or memory."""
    import datasets

    label = shown or (f"{name}:{config}@{split}" if config else f"{name}@{split}")
    caps = hub_caps()
    try:
        if caps is None:
            ds = datasets.load_dataset(name, config, split=split)
        else:
            return _read_hub_capped(name, config, split, label, caps)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot load"
        hint = " (offline: HF_HUB_OFFLINE is set or the Hub cannot be reached; download it first or use a local file)"
        offline = "offline" in str(e).lower() or isinstance(e, ConnectionError)
        raise fatal(label, "unreadable", f"cannot load the Hub dataset: {e}{hint if offline else ''}") from None
    rows = ds.to_list()
    return RawData(label, "hub", rows, list(range(1, len(rows) + 1)))


def _read_hub_capped(name: str, config: str | None, split: str, label: str, caps: tuple[int, float]) -> RawData:
    import datasets

    max_rows, max_mb = caps
    take = None
    m = _SLICE.match(split)
    if m:  # a streamed split takes no slice syntax: `train[:N]` is the first N rows
        split, take = m.group(1), int(m.group(2))
    elif "[" in split:
        raise fatal(label, "unreadable", f"split {split!r}: this server takes a split name or split[:N] (the first N rows)")
    ds = datasets.load_dataset(name, config, split=split, streaming=True, token=False)
    rows: list[Any] = []
    size = 0
    for row in ds:
        if take is not None and len(rows) >= take:
            break
        rows.append(row)
        size += len(json.dumps(row, default=str))
        if max_rows and len(rows) > max_rows:
            raise fatal(label, "unreadable", f"the Hub dataset has more than {max_rows:,} rows, this server's limit "
                        f"({HUB_ROWS_ENV}): take the first rows with @{split}[:{max_rows}]")
        if max_mb and size > max_mb * 2**20:
            raise fatal(label, "unreadable", f"the Hub dataset is over {max_mb:g} MB, this server's limit ({HUB_MB_ENV}): "
                        f"take fewer rows with @{split}[:N]")
    return RawData(label, "hub", rows, list(range(1, len(rows) + 1)))


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


__all__ = ["RawData", "DataError", "read_source", "read_file", "read_hub", "parse_hub_spec", "SUFFIXES"]
