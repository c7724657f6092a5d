"""One small file per error kind: the report names the exact file, row and field; bad rows
are dropped with a count or the data is refused; random rows never raise anything else."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_studio.data import DataError, DataReport, Problem, load_examples, load_samples

GOOD = {"instruction": "Say hello", "output": "hello"}


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def only_problem(report: DataReport) -> Problem:
    assert len(report.problems) == 1, report.summary()
    return report.problems[0]


ROW_CASES = [
    # (rows, expected (row, field, kind, severity), words in the message)
    ([GOOD, {"instruction": "x"}], (2, "output", "missing_field", "error"), "missing"),
    ([GOOD, {"instruction": "x", "output": None}], (2, "output", "missing_field", "error"), "missing"),
    ([GOOD, GOOD | {"output": " \n"}], (2, "output", "empty_field", "error"), "empty"),
    ([{"instruction": 7, "output": "x"}], (1, "instruction", "wrong_type", "error"), "expected text, got a number (7)"),
    ([GOOD, {"instruction": "x", "input": ["a"], "output": "y"}], (2, "input", "wrong_type", "error"), "got a list"),
    ([GOOD, "{broken", GOOD | {"instruction": "Other"}], (2, None, "invalid_json", "error"), "not valid JSON"),
    ([GOOD, "[1]"], (2, None, "not_an_object", "error"), "got an array"),
    ([GOOD, {"instruction": "Say hello", "output": "hello"}], (2, None, "duplicate", "warning"), "repeats row 1"),
]


@pytest.mark.parametrize(("rows", "expected", "words"), ROW_CASES)
def test_alpaca_row_problems(tmp_path, rows, expected, words):
    path = jsonl(tmp_path / "data.jsonl", rows)
    _, report = load_samples(path)
    p = only_problem(report)
    assert (p.file, p.row, p.field, p.kind, p.severity) == (str(path), *expected)
    assert words in p.message


USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}

MESSAGE_CASES = [
    ({"messages": "hi"}, ("messages", "wrong_type"), "expected a list of turns, got text"),
    ({"messages": []}, ("messages", "empty_field"), "no turns"),
    ({"messages": [USER, "hello"]}, ("messages[1]", "wrong_type"), "expected an object with role and content"),
    ({"messages": [USER, {"content": "x"}]}, ("messages[1].role", "missing_field"), "missing"),
    ({"messages": [USER, {"role": "assistant", "content": 3}]}, ("messages[1].content", "wrong_type"), "got a number"),
    ({"messages": [USER, {"role": "assistant", "content": ""}]}, ("messages[1].content", "empty_field"), "empty"),
    ({"messages": [USER, {"role": "tool", "content": "x"}]}, ("messages[1].role", "unknown_role"), "unknown role 'tool'"),
    ({"messages": [BOT, USER, BOT]}, ("messages[0].role", "role_order"), "expected a user turn after the start, got assistant"),
    ({"messages": [USER, USER, BOT]}, ("messages[1].role", "role_order"), "expected a assistant turn after user, got user"),
    (
        {"messages": [USER, {"role": "system", "content": "s"}, BOT]},
        ("messages[1].role", "role_order"),
        "a system turn may only come first",
    ),
    ({"messages": [{"role": "system", "content": "s"}, USER]}, ("messages", "role_order"), "no assistant turn"),
]


@pytest.mark.parametrize(("row", "expected", "words"), MESSAGE_CASES)
def test_messages_row_problems(tmp_path, row, expected, words):
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": [USER, BOT]}, row])
    _, report = load_samples(path)
    p = only_problem(report)
    assert (p.file, p.row, p.field, p.kind, p.severity) == (str(path), 2, *expected, "error")
    assert words in p.message


def test_sharegpt_fields_use_from_and_value(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}]
    _, report = load_samples(jsonl(tmp_path / "s.jsonl", rows))
    p = only_problem(report)
    assert (p.row, p.field, p.kind) == (1, "conversations[1].value", "missing_field")


def test_last_user_turn_without_reply_is_a_warning_and_left_out(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [{"messages": [USER, BOT, USER]}])
    samples, report = load_samples(path)
    p = only_problem(report)
    assert (p.row, p.field, p.kind, p.severity) == (1, "messages[2].role", "role_order", "warning")
    assert samples[0].messages == [USER, BOT]


def test_non_utf8_jsonl_names_row_and_field(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "x", "output": "caf\xe9"}\n')
    _, report = load_samples(path)
    p = only_problem(report)
    assert (p.row, p.field, p.kind) == (2, "output", "not_utf8")
    assert "byte 0xe9 at character 4" in p.message


def test_non_utf8_csv_names_spreadsheet_row_and_mapped_column(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"question,answer\nhi,there\nwhat,caf\xe9\n")
    _, report = load_samples(path, columns={"instruction": "question", "output": "answer"})
    p = only_problem(report)
    assert (p.row, p.field, p.kind) == (3, "answer", "not_utf8")


def test_csv_empty_cell_names_the_users_column(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nhi,there\nwhat,\n")
    _, report = load_samples(path, columns={"instruction": "question", "output": "answer"})
    p = only_problem(report)
    assert (p.row, p.field, p.kind) == (3, "answer", "empty_field")
    assert str(p) == f"{path}, row 3, field 'answer': empty"


@pytest.mark.parametrize(("name", "content"), [("e.jsonl", ""), ("e.csv", "question,answer\n"), ("e.json", "[]")])
def test_empty_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_samples(path)
    assert [(p.file, p.row, p.kind) for p in e.value.problems] == [(str(path), None, "empty_file")]


def test_file_with_no_readable_row(tmp_path):
    path = jsonl(tmp_path / "bad.jsonl", ["nope", "also nope"])
    with pytest.raises(DataError) as e:
        load_samples(path)
    assert [(p.row, p.kind) for p in e.value.problems] == [(1, "invalid_json"), (2, "invalid_json")]


# ---------------------------------------------------------------- lengths (needs a tokenizer)


def test_over_long_rows_are_truncated_with_a_warning(tmp_path, tokenizer):
    rows = [GOOD, {"instruction": "Say hello", "output": "hello " * 40}]
    examples, report = load_examples(jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_seq_len=24)
    p = only_problem(report)
    assert (p.row, p.kind, p.severity) == (2, "too_long", "warning")
    assert "longer than max_seq_len=24" in p.message
    assert report.n_truncated == 1 and len(examples) == 2
    assert examples[1].truncated and len(examples[1].input_ids) == 24 and examples[1].full_length > 24


def test_rows_with_nothing_left_to_train_are_errors(tmp_path, tokenizer):
    rows = [GOOD, {"instruction": "hello " * 40, "output": "hello"}]
    path = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_examples(path, tokenizer, max_seq_len=24)
    assert [(p.row, p.kind) for p in e.value.problems] == [(2, "nothing_to_train")]
    examples, report = load_examples(path, tokenizer, max_seq_len=24, drop_invalid=True)
    assert [ex.row for ex in examples] == [1] and report.n_dropped == 1


# ---------------------------------------------------------------- refuse or drop


def mixed_file(tmp_path):
    rows = [GOOD, {"instruction": "x"}, GOOD | {"instruction": "Other"}, GOOD, GOOD | {"output": ""}, "{oops"]
    return jsonl(tmp_path / "mixed.jsonl", rows)


def test_refusal_lists_every_error_with_row_and_field(tmp_path, tokenizer):
    path = mixed_file(tmp_path)
    with pytest.raises(DataError) as e:
        load_examples(path, tokenizer)
    text = str(e.value)
    assert "3 of 6 rows cannot be trained on" in text and "--drop-invalid" in text
    assert f"{path}, row 2, field 'output': missing" in text
    assert f"{path}, row 5, field 'output': empty" in text
    assert f"{path}, row 6: not valid JSON" in text
    assert e.value.report.refused
    assert [(p.row, p.kind) for p in e.value.report.warnings] == [(4, "duplicate")]


def test_drop_invalid_drops_bad_and_duplicate_rows_and_counts_them(tmp_path, tokenizer):
    examples, report = load_examples(mixed_file(tmp_path), tokenizer, drop_invalid=True)
    assert [ex.row for ex in examples] == [1, 3]
    assert report.n_dropped == 4 and report.n_train == 2 and report.n_rows == 6
    assert not report.ok and not report.refused


def test_duplicates_are_kept_unless_dropping(tmp_path, tokenizer):
    examples, report = load_examples(jsonl(tmp_path / "d.jsonl", [GOOD, GOOD]), tokenizer)
    assert len(examples) == 2 and report.ok and report.n_dropped == 0


def test_report_for_the_ui(tmp_path, tokenizer):
    _, report = load_samples(mixed_file(tmp_path))
    summary = report.summary()
    assert summary.splitlines()[0] == f"{tmp_path / 'mixed.jsonl'}: 6 rows, format alpaca (detected)"
    assert "3 rows usable; 3 with errors; 1 duplicates" in summary
    assert "problems: 3 errors, 1 warnings" in summary
    frame = report.problems_frame()
    assert list(frame.columns) == ["file", "row", "field", "kind", "severity", "message"]
    assert frame["row"].tolist() == [2, 4, 5, 6]
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["n_error_rows"] == 3 and as_dict["counts"] == {
        "missing_field": 1,
        "duplicate": 1,
        "empty_field": 1,
        "invalid_json": 1,
    }


# ---------------------------------------------------------------- property: DataError or success, nothing else

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12))
turn = st.dictionaries(
    st.sampled_from(["role", "content", "from", "value", "x"]),
    st.one_of(scalars, st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool"])),
    max_size=3,
)
values = st.one_of(scalars, st.lists(st.one_of(turn, scalars), max_size=4), st.dictionaries(st.text(max_size=3), scalars, max_size=2))
row = st.dictionaries(
    st.sampled_from(["instruction", "input", "output", "messages", "conversations", "prompt", "completion", "text", "q"]),
    values,
    max_size=4,
)
line = st.one_of(row, st.text(max_size=10), st.lists(scalars, max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, max_size=6), fmt=st.sampled_from([None, "alpaca", "messages", "sharegpt", "text"]))
def test_random_rows_load_or_fail_with_a_data_error(tmp_path_factory, tokenizer, lines, fmt):
    path = tmp_path_factory.mktemp("prop") / "random.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)).replace("\n", " ") + "\n" for x in lines))
    for drop in (False, True):
        try:
            examples, report = load_examples(path, tokenizer, fmt=fmt, max_seq_len=64, drop_invalid=drop)
        except DataError as e:
            assert str(e)
            continue
        assert examples and all(ex.n_trained > 0 for ex in examples)
        assert report.n_train == len(examples) <= report.n_rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=80), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]))
def test_random_bytes_load_or_fail_with_a_data_error(tmp_path_factory, tokenizer, data, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"random{suffix}"
    path.write_bytes(data)
    try:
        load_examples(path, tokenizer, max_seq_len=64, drop_invalid=True)
    except DataError as e:
        assert str(e)


def test_a_file_level_error_leaves_no_row_usable_never_a_negative_count(tmp_path):
    from lora_studio.data import inspect_data

    path = tmp_path / "qa.csv"
    path.write_text("Question,Answer\nhi,there\nbye,now\n")
    report = inspect_data(path).report  # unknown format: the whole file is in error
    assert report.errors and report.errors[0].row is None
    assert report.n_usable == 0
    assert "0 rows usable" in report.summary()
