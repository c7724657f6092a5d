"""What can be wrong with a user's data, as values the UI can list and the CLI can print.

A `Problem` names the file, the row (where it lies in the file: the line of a JSONL file,
the spreadsheet row of a CSV/TSV file, the 1-based record of JSON/Parquet/Hub data) and the
field (`output`, `messages[2].role`). Errors make a row untrainable: it is dropped
(`drop_invalid`) or the run is refused. Warnings keep the row (truncated, duplicated).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ERROR = "error"
WARNING = "warning"

# kind -> what it means (shown by `inspect` and usable as UI help text)
KINDS: dict[str, str] = {
    "unreadable": "the file cannot be read (not found, not UTF-8 text, broken CSV or JSON document)",
    "empty_file": "the file holds no rows",
    "unknown_format": "no known format fits the columns (map them with --columns)",
    "invalid_json": "a JSONL line is not valid JSON",
    "not_an_object": "a record is not a JSON object",
    "extra_fields": "a CSV/TSV row has more values than the header has columns (an unquoted separator?)",
    "missing_field": "a required field is absent or null",
    "empty_field": "a required field is empty or only whitespace",
    "wrong_type": "a field holds the wrong type (e.g. a number where text is needed)",
    "unknown_role": "a conversation turn has a role other than system/user/assistant",
    "role_order": "conversation turns are out of order (system first, then user/assistant alternating)",
    "not_utf8": "text holds bytes that are not valid UTF-8",
    "duplicate": "the row repeats an earlier row",
    "too_long": "the row has more tokens than max_seq_len and is truncated",
    "nothing_to_train": "no reply token fits within max_seq_len",
    "template": "the chat template cannot render the row",
}


@dataclass(frozen=True)
class Problem:
    file: str
    """The file (or Hub dataset) the row comes from."""
    row: int | None
    """Where the row lies in the file (see the module docstring); None for the whole file."""
    field: str | None
    """The field at fault (`output`, `messages[2].content`); None for the whole row."""
    kind: str
    """A key of KINDS."""
    message: str
    """What is wrong, in words, without the file/row/field prefix."""
    severity: str = ERROR
    """`error`: the row cannot be trained on; `warning`: it is kept."""

    def __str__(self) -> str:
        where = [self.file]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field:
            where.append(f"field '{self.field}'")
        return ", ".join(where) + ": " + self.message

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DataError(ValueError):
    """A problem with the user's data, naming file, row and field.

    `problems` lists every problem found (not only the first); `report` is the full
    `DataReport` when the refusal came after validation.
    """

    def __init__(self, message: str, problems: list[Problem] | None = None, report: Any = None) -> None:
        super().__init__(message)
        self.problems: list[Problem] = list(problems or [])
        self.report = report


def fatal(file: str, kind: str, message: str) -> DataError:
    """A problem with the whole file: nothing can be trained from it."""
    problem = Problem(file, None, None, kind, message)
    return DataError(str(problem), [problem])
