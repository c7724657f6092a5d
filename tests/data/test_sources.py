"""Reading each file type (and Hub datasets) into rows numbered the way the user sees them."""

from __future__ import annotations

import json

import pytest

from lora_studio.data import DataError
from lora_studio.data.sources import parse_hub_spec, read_source

ROWS = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say bye", "output": "bye"}]


def test_jsonl_rows_are_numbered_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    raw = read_source(path)
    assert raw.kind == "jsonl"
    assert raw.rows == ROWS
    assert raw.row_numbers == [1, 3]  # the blank line 2 keeps its number


def test_jsonl_bad_lines_become_row_problems_not_failures(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n[1, 2]\n" + json.dumps(ROWS[1]) + "\n")
    raw = read_source(path)
    assert raw.rows == ROWS and raw.row_numbers == [1, 4]
    assert [(p.row, p.kind) for p in raw.problems] == [(2, "invalid_json"), (3, "not_an_object")]
    assert raw.n_rows == 4


def test_line_separator_inside_a_string_does_not_shift_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a\u2028b", "output": "x"}\n{"instruction": "c", "output": "y"}\n', encoding="utf-8")
    raw = read_source(path)
    assert raw.row_numbers == [1, 2]
    assert raw.rows[0]["instruction"] == "a\u2028b"


@pytest.mark.parametrize(
    "doc",
    [ROWS, {"data": ROWS}, {"instruction": ["Say hi", "Say bye"], "output": ["hi", "bye"]}],
    ids=["array", "wrapped", "columns"],
)
def test_json_documents(tmp_path, doc):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc, indent=2))
    raw = read_source(path)
    assert raw.kind == "json"
    assert raw.rows == ROWS
    assert raw.row_numbers == [1, 2]


def test_content_wins_over_the_suffix(tmp_path):
    as_array = tmp_path / "array.jsonl"
    as_array.write_text(json.dumps(ROWS))
    as_lines = tmp_path / "lines.json"
    as_lines.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert read_source(as_array).rows == ROWS
    assert read_source(as_lines).rows == ROWS


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1},\n  {"a": }\n]')
    with pytest.raises(DataError) as e:
        read_source(path)
    assert e.value.problems[0].kind == "unreadable"
    assert "line 3 column 9" in str(e.value) and str(path) in str(e.value)


def test_csv_rows_are_spreadsheet_rows_and_cells_stay_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('question,answer\nWhat is 2+2?,4\n"multi\nline",NA\n')
    raw = read_source(path)
    assert raw.kind == "csv"
    assert raw.rows == [{"question": "What is 2+2?", "answer": "4"}, {"question": "multi\nline", "answer": "NA"}]
    assert raw.row_numbers == [2, 3]


def test_tsv_and_bom(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_bytes("\ufeffquestion\tanswer\nhi\tthere\n".encode("utf-8"))
    raw = read_source(path)
    assert raw.columns == ["question", "answer"]
    assert raw.rows == [{"question": "hi", "answer": "there"}]


def test_broken_csv_is_refused_with_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('a,b\n1,2\n"3,4\n5,6,7\n')
    with pytest.raises(DataError) as e:
        read_source(path)
    assert e.value.problems[0].kind == "unreadable" and "CSV" in str(e.value)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    raw = read_source(path)
    assert raw.kind == "parquet"
    assert raw.rows == rows and raw.row_numbers == [1]


def test_undecodable_bytes_survive_as_surrogates(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    raw = read_source(path)
    assert raw.rows[0]["instruction"] == "caf\udce9"


def test_utf16_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("a,b\n1,2\n".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        read_source(path)


@pytest.mark.parametrize(
    ("name", "content", "kind", "words"),
    [
        ("missing.jsonl", None, "unreadable", "file not found"),
        ("empty.jsonl", "", "empty_file", "empty"),
        ("blank.json", "  \n\n", "empty_file", "empty"),
        ("empty.csv", "", "empty_file", "empty"),
        ("sheet.xlsx", "PK\x03\x04", "unreadable", "unsupported file type '.xlsx'"),
    ],
)
def test_file_level_problems(tmp_path, name, content, kind, words):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as e:
        read_source(path)
    assert e.value.problems[0].kind == kind
    assert e.value.problems[0].file == str(path)
    assert words in str(e.value)


def test_display_name_replaces_the_upload_path(tmp_path):
    path = tmp_path / "gradio-tmp-8f3a.jsonl"
    path.write_text("{bad\n")
    raw = read_source(path, name="my_data.jsonl")
    assert raw.problems[0].file == "my_data.jsonl"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tatsu-lab/alpaca", ("tatsu-lab/alpaca", None, "train")),
        ("owner/name:en@validation", ("owner/name", "en", "validation")),
        ("hub:squad@train[:100]", ("squad", None, "train[:100]")),
        ("hf://datasets/owner/name", ("owner/name", None, "train")),
        ("missing.jsonl", None),
        ("some/dir/file.csv", None),
        ("two words", None),
    ],
)
def test_parse_hub_spec(spec, expected):
    assert parse_hub_spec(spec) == expected


def test_hub_dataset_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    raw = read_source("owner/name:en@test")
    assert calls == [("owner/name", "en", "test")]
    assert raw.kind == "hub" and raw.rows == ROWS and raw.row_numbers == [1, 2]
    assert raw.source == "owner/name:en@test"


def test_hub_dataset_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        read_source("lora-studio-tests/no-such-dataset@train")
    problem = e.value.problems[0]
    assert problem.kind == "unreadable" and problem.file == "lora-studio-tests/no-such-dataset@train"
    assert "no such local file, and cannot load the Hub dataset" in str(e.value) and "offline" in str(e.value)


def test_single_conversation_object_is_one_record(tmp_path):
    conv = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = tmp_path / "one.json"
    path.write_text(json.dumps(conv, indent=2))
    raw = read_source(path)
    assert raw.rows == [conv] and raw.row_numbers == [1]


def test_csv_row_with_more_values_than_the_header_is_a_problem_not_silently_cut(tmp_path):
    path = tmp_path / "d.csv"
    # Row 3 has an unquoted comma in its answer: pandas alone keeps "Paris" and drops " France".
    path.write_text('question,answer\nWhat is 2+2?,4\nCapital of France?,Paris, France\n\n"a,b",c\n')
    raw = read_source(path)
    assert raw.rows == [{"question": "What is 2+2?", "answer": "4"}, {"question": "a,b", "answer": "c"}]
    assert raw.row_numbers == [2, 4]
    (problem,) = raw.problems
    assert (problem.file, problem.row, problem.kind) == (str(path), 3, "extra_fields")
    assert "3 values" in problem.message and "2 columns" in problem.message


def test_csv_header_after_blank_lines_is_still_the_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\n\nquestion,answer\nhi,there\n")
    raw = read_source(path)
    assert raw.rows == [{"question": "hi", "answer": "there"}] and not raw.problems
