"""The row formats people's files come in, detected from the columns (or named by the user),
and their conversion into one shape: a conversation of system/user/assistant messages, or
a plain text for continued pretraining.

    alpaca             instruction, input (optional), output, system (optional)
    messages           messages: [{role, content}, ...]            (OpenAI chat style)
    sharegpt           conversations: [{from, value}, ...]         (human/gpt/system)
    prompt-completion  prompt, completion, system (optional)       (one user turn, one reply)
    text               text                                        (every token trained)

Column mapping: `columns` maps our field names to the file's, e.g. {"instruction":
"question", "output": "answer"}; `role`/`content` rename the keys inside the turns.
Problems name the file's own column names, since that is what the user can look up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lora_studio.data.problems import ERROR, WARNING, DataError, Problem, fatal
from lora_studio.data.sources import RawData

Message = dict[str, str]

FORMATS = ("alpaca", "messages", "sharegpt", "prompt-completion", "text")
REQUIRED: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
OPTIONAL: dict[str, tuple[str, ...]] = {"alpaca": ("input", "system"), "prompt-completion": ("system",)}
TURN_KEYS = ("role", "content")
MAPPABLE = sorted({f for fields in (*REQUIRED.values(), *OPTIONAL.values()) for f in fields} | set(TURN_KEYS))

# Role names seen in the wild -> ours. Tool/function turns are refused: we cannot mask them right.
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
}

# Columns that usually mean a prompt, and a reply: used to suggest a --columns mapping.
PROMPT_LIKE = ("question", "query", "prompt", "input", "instruction", "user", "q", "source", "context")
REPLY_LIKE = ("answer", "response", "output", "completion", "reply", "target", "assistant", "a", "label")

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Sample:
    """One usable row: a conversation, or a text (format `text`)."""

    file: str
    row: int
    messages: list[Message] | None = None
    text: str | None = None

    def key(self) -> str:
        """Identity for duplicate detection: the content that would be trained."""
        return json.dumps([self.messages, self.text], sort_keys=True, ensure_ascii=False)


def parse_columns(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """`instruction=question,output=answer` -> {"instruction": "question", "output": "answer"}."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        ours, sep, theirs = part.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise DataError(f"column mapping {part!r}: expected FIELD=COLUMN, e.g. instruction=question,output=answer")
        mapping[ours.strip()] = theirs.strip()
    return mapping


def check_columns(columns: Mapping[str, str], raw: RawData, fmt: str) -> None:
    """A mapping may only rename fields we know, to columns the file has."""
    unknown = sorted(set(columns) - set(MAPPABLE))
    if unknown:
        raise fatal(raw.source, "unknown_format", f"cannot map {', '.join(unknown)}: the fields are {', '.join(MAPPABLE)}")
    have = set(raw.columns)
    for ours, theirs in columns.items():
        if ours not in TURN_KEYS and theirs not in have and ours in REQUIRED[fmt] + OPTIONAL.get(fmt, ()):
            raise fatal(
                raw.source,
                "missing_field",
                f"the column mapping {ours}={theirs} names a column the file does not have "
                f"(columns: {', '.join(raw.columns) or 'none'})",
            )


def detect_format(file_columns: list[str], columns: Mapping[str, str] | None = None) -> str | None:
    """The format whose required fields the columns hold (after mapping); None if none does."""
    columns = columns or {}
    have = set(file_columns)
    present = {f for f in MAPPABLE if columns.get(f, f) in have}
    for fmt in ("messages", "sharegpt", "alpaca", "prompt-completion", "text"):
        if all(f in present for f in REQUIRED[fmt]):
            return fmt
    return None


def suggest_mapping(file_columns: list[str]) -> str | None:
    """A --columns value that would likely fit, e.g. `instruction=question,output=answer`."""
    lower = {c.lower(): c for c in file_columns}
    prompt = next((lower[c] for c in PROMPT_LIKE if c in lower), None)
    reply = next((lower[c] for c in REPLY_LIKE if c in lower and lower[c] != prompt), None)
    if prompt and reply:
        return f"instruction={prompt},output={reply}"
    return None


def resolve_format(raw: RawData, fmt: str | None, columns: Mapping[str, str] | None = None) -> str:
    """The user's format if given (checked), else the detected one; refuses with a hint."""
    columns = dict(columns or {})
    if fmt in (None, "", "auto"):
        found = detect_format(raw.columns, columns)
        if found is None:
            hint = suggest_mapping(raw.columns)
            expected = "; ".join(f"{name}: {', '.join(REQUIRED[name])}" for name in FORMATS)
            raise fatal(
                raw.source,
                "unknown_format",
                f"unknown format: the columns are {', '.join(raw.columns) or 'none'}, but every format needs "
                f"its fields ({expected})"
                + (f"; map yours with --columns {hint}" if hint else "; map yours with --columns FIELD=COLUMN"),
            )
        fmt = found
    if fmt not in FORMATS:
        raise fatal(raw.source, "unknown_format", f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_columns(columns, raw, fmt)
    missing = [columns.get(f, f) for f in REQUIRED[fmt] if columns.get(f, f) not in raw.columns]
    if missing and raw.rows:
        raise fatal(
            raw.source,
            "missing_field",
            f"format {fmt} needs column(s) {', '.join(missing)}; the file has {', '.join(raw.columns) or 'none'}"
            " (map them with --columns FIELD=COLUMN)",
        )
    return fmt


class _Row:
    """Collects the problems of one row while its fields are read."""

    def __init__(self, file: str, row: int) -> None:
        self.file, self.row = file, row
        self.problems: list[Problem] = []

    def add(self, field: str | None, kind: str, message: str, severity: str = ERROR) -> None:
        self.problems.append(Problem(self.file, self.row, field, kind, message, severity))

    @property
    def failed(self) -> bool:
        return any(p.severity == ERROR for p in self.problems)

    def text(self, value: Any, field: str, required: bool = True) -> str | None:
        """A text field: present (if required), a string, not blank, valid UTF-8."""
        if value is None:
            if required:
                self.add(field, "missing_field", "missing")
            return None
        if not isinstance(value, str):
            self.add(field, "wrong_type", f"expected text, got {_type_name(value)}")
            return None
        bad = _SURROGATE.search(value)
        if bad:
            code = ord(bad.group()) - 0xDC00
            byte = f"byte 0x{code:02x}" if 0x80 <= code <= 0xFF else "a lone surrogate"
            self.add(field, "not_utf8", f"not valid UTF-8 text ({byte} at character {bad.start() + 1}); save the file as UTF-8")
            return None
        if not value.strip():
            if required:
                self.add(field, "empty_field", "empty")
            return None
        return value


def convert_row(
    row: Mapping[str, Any],
    fmt: str,
    file: str,
    row_number: int,
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> tuple[Sample | None, list[Problem]]:
    """One row -> a Sample, or None with the errors that prevent it (warnings may come with
    a Sample: the row is usable)."""
    columns = columns or {}
    col = lambda name: columns.get(name, name)  # noqa: E731 - the file's name for our field
    r = _Row(file, row_number)
    if fmt == "text":
        text = r.text(row.get(col("text")), col("text"))
        return (None if r.failed else Sample(file, row_number, text=text)), r.problems
    if fmt in ("alpaca", "prompt-completion"):
        prompt_field, reply_field = ("instruction", "output") if fmt == "alpaca" else ("prompt", "completion")
        prompt = r.text(row.get(col(prompt_field)), col(prompt_field))
        reply = r.text(row.get(col(reply_field)), col(reply_field))
        extra = r.text(row.get(col("input")), col("input"), required=False) if fmt == "alpaca" else None
        system = r.text(row.get(col("system")), col("system"), required=False)
        if r.failed:
            return None, r.problems
        user = prompt if not extra else f"{prompt}\n\n{extra}"
        messages: list[Message] = []
        if system or system_prompt:
            messages.append({"role": "system", "content": system or system_prompt})
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return Sample(file, row_number, messages=messages), r.problems
    name = col("messages" if fmt == "messages" else "conversations")
    messages = _turns(r, row.get(name), name, fmt, columns)
    if messages is None or r.failed:
        return None, r.problems
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Sample(file, row_number, messages=messages), r.problems


def _turns(r: _Row, value: Any, name: str, fmt: str, columns: Mapping[str, str]) -> list[Message] | None:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:  # a conversation stored as JSON text (CSV cells)
            value = json.loads(value)
        except json.JSONDecodeError as e:
            r.add(name, "wrong_type", f"expected a list of turns; the text is not valid JSON ({e.msg})")
            return None
    if value is None:
        r.add(name, "missing_field", "missing")
        return None
    if not isinstance(value, list):
        r.add(name, "wrong_type", f"expected a list of turns, got {_type_name(value)}")
        return None
    if not value:
        r.add(name, "empty_field", "no turns")
        return None
    role_default, content_default = ("role", "content") if fmt == "messages" else ("from", "value")
    messages: list[Message] = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            r.add(where, "wrong_type", f"expected an object with {role_default} and {content_default}, got {_type_name(turn)}")
            continue
        role_key = _pick(turn, columns.get("role"), role_default, ("role", "from"))
        content_key = _pick(turn, columns.get("content"), content_default, ("content", "value"))
        role = r.text(turn.get(role_key), f"{where}.{role_key}")
        content = r.text(_join_parts(turn.get(content_key)), f"{where}.{content_key}")
        if role is None:
            continue
        ours = ROLES.get(role.strip().lower())
        if ours is None:
            r.add(f"{where}.{role_key}", "unknown_role", f"unknown role {role!r}: use system, user or assistant")
            continue
        if content is not None:
            messages.append({"role": ours, "content": content, "_field": f"{where}.{role_key}"})
    if r.failed:
        return None
    return _check_order(r, messages, name)


def _check_order(r: _Row, messages: list[dict[str, str]], name: str) -> list[Message] | None:
    """System only first; then user and assistant alternating, starting with user; at least
    one reply. A last user turn without a reply is dropped with a warning."""
    expected = "user"
    for i, m in enumerate(messages):
        if m["role"] == "system":
            if i != 0:
                r.add(m["_field"], "role_order", "a system turn may only come first")
                return None
            continue
        if m["role"] != expected:
            previous = messages[i - 1]["role"] if i else "the start"
            r.add(m["_field"], "role_order", f"expected a {expected} turn after {previous}, got {m['role']}")
            return None
        expected = "assistant" if expected == "user" else "user"
    if not any(m["role"] == "assistant" for m in messages):
        r.add(name, "role_order", "no assistant turn to train on")
        return None
    if messages[-1]["role"] == "user":
        r.add(messages[-1]["_field"], "role_order", "the last user turn has no reply; it is left out", WARNING)
        messages = messages[:-1]
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _pick(turn: dict[str, Any], mapped: str | None, default: str, known: tuple[str, ...]) -> str:
    if mapped:
        return mapped
    return next((k for k in known if k in turn), default)


def _join_parts(content: Any) -> Any:
    """OpenAI content parts [{"type": "text", "text": ...}] -> one text; anything else as is."""
    if isinstance(content, list) and content and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        texts = [p.get("text") for p in content]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    return content


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "text"
    return type(value).__name__
