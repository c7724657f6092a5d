"""Each format, detected and converted to the same conversations; column mapping; system prompt."""

from __future__ import annotations

import json

import pytest

from lora_studio.data import DataError, detect_format, load_samples, parse_columns

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is the capital of France?"}
REPLY = {"role": "assistant", "content": "Paris."}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


FILES = {
    "alpaca": [{"instruction": "What is the capital of France?", "input": "", "output": "Paris."}],
    "messages": [{"messages": [USER, REPLY]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": USER["content"]}, {"from": "gpt", "value": "Paris."}]}],
    "prompt-completion": [{"prompt": "What is the capital of France?", "completion": "Paris."}],
}


@pytest.mark.parametrize("fmt", list(FILES))
def test_each_chat_format_is_detected_and_gives_the_same_conversation(tmp_path, fmt):
    samples, report = load_samples(jsonl(tmp_path / f"{fmt}.jsonl", FILES[fmt]))
    assert report.format == fmt and report.format_detected
    assert report.problems == []
    assert [s.messages for s in samples] == [[USER, REPLY]]
    assert samples[0].row == 1


def test_text_format(tmp_path):
    samples, report = load_samples(jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}]))
    assert report.format == "text"
    assert samples[0].text == "Once upon a time." and samples[0].messages is None


def test_alpaca_input_is_appended_to_the_instruction(tmp_path):
    rows = [{"instruction": "Translate to French.", "input": "cat", "output": "chat"}]
    samples, _ = load_samples(jsonl(tmp_path / "a.jsonl", rows))
    assert samples[0].messages[0] == {"role": "user", "content": "Translate to French.\n\ncat"}


def test_system_prompt_is_added_unless_the_row_has_its_own(tmp_path):
    rows = [{"messages": [USER, REPLY]}, {"messages": [{"role": "system", "content": "Own."}, USER, REPLY]}]
    samples, _ = load_samples(jsonl(tmp_path / "m.jsonl", rows), system_prompt="Be brief.")
    assert samples[0].messages == [SYSTEM, USER, REPLY]
    assert samples[1].messages[0] == {"role": "system", "content": "Own."}


def test_alpaca_system_column(tmp_path):
    rows = [{"instruction": USER["content"], "output": "Paris.", "system": "Be brief."}]
    samples, _ = load_samples(jsonl(tmp_path / "a.jsonl", rows), system_prompt="ignored")
    assert samples[0].messages == [SYSTEM, USER, REPLY]


def test_multi_turn_messages_keep_every_turn(tmp_path):
    turns = [USER, REPLY, {"role": "user", "content": "And Spain?"}, {"role": "assistant", "content": "Madrid."}]
    samples, report = load_samples(jsonl(tmp_path / "m.jsonl", [{"messages": turns}]))
    assert samples[0].messages == turns and report.problems == []


def test_openai_content_parts_are_joined(tmp_path):
    parts = {"role": "user", "content": [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]}
    samples, _ = load_samples(jsonl(tmp_path / "m.jsonl", [{"messages": [parts, REPLY]}]))
    assert samples[0].messages == [USER, REPLY]


def test_sharegpt_with_system_and_role_names(tmp_path):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": USER["content"]}, {"from": "gpt", "value": "Paris."}]
    samples, _ = load_samples(jsonl(tmp_path / "s.jsonl", [{"conversations": conv}]))
    assert samples[0].messages == [SYSTEM, USER, REPLY]


def test_csv_with_column_mapping(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nWhat is the capital of France?,Paris.\n")
    samples, report = load_samples(path, columns=parse_columns("instruction=question,output=answer"))
    assert report.format == "alpaca"
    assert samples[0].messages == [USER, REPLY] and samples[0].row == 2


def test_nested_keys_can_be_mapped(tmp_path):
    rows = [{"dialog": [{"speaker": "user", "text": USER["content"]}, {"speaker": "assistant", "text": "Paris."}]}]
    samples, report = load_samples(
        jsonl(tmp_path / "d.jsonl", rows), columns={"messages": "dialog", "role": "speaker", "content": "text"}
    )
    assert report.format == "messages" and samples[0].messages == [USER, REPLY]


def test_messages_stored_as_json_text_in_a_csv(tmp_path):
    import pandas as pd

    path = tmp_path / "m.csv"
    pd.DataFrame({"messages": [json.dumps([USER, REPLY])]}).to_csv(path, index=False)
    samples, report = load_samples(path)
    assert report.format == "messages" and samples[0].messages == [USER, REPLY]


def test_format_can_be_forced(tmp_path):
    rows = [{"text": "not used", "prompt": USER["content"], "completion": "Paris."}]
    path = jsonl(tmp_path / "p.jsonl", rows)
    _, detected = load_samples(path)
    samples, forced = load_samples(path, fmt="text")
    assert detected.format == "prompt-completion"
    assert forced.format == "text" and not forced.format_detected and samples[0].text == "not used"


@pytest.mark.parametrize(
    ("columns", "mapping", "expected"),
    [
        (["messages"], {}, "messages"),
        (["conversations", "id"], {}, "sharegpt"),
        (["instruction", "input", "output"], {}, "alpaca"),
        (["prompt", "completion"], {}, "prompt-completion"),
        (["text", "meta"], {}, "text"),
        (["question", "answer"], {"instruction": "question", "output": "answer"}, "alpaca"),
        (["question", "answer"], {}, None),
        (["instruction"], {}, None),
    ],
)
def test_detect_format(columns, mapping, expected):
    assert detect_format(columns, mapping) == expected


def test_unknown_format_suggests_a_mapping(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("Question,Answer\nhi,there\n")
    with pytest.raises(DataError) as e:
        load_samples(path)
    problem = e.value.problems[0]
    assert problem.kind == "unknown_format" and problem.file == str(path) and problem.row is None
    assert "the columns are Question, Answer" in problem.message
    assert "--columns instruction=Question,output=Answer" in problem.message


def test_forced_format_without_its_columns_is_refused(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(DataError) as e:
        load_samples(path, fmt="messages")
    assert e.value.problems[0].kind == "missing_field"
    assert "format messages needs column(s) messages" in str(e.value)


def test_mapping_to_a_missing_column_is_refused(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"question": "x", "output": "y"}])
    with pytest.raises(DataError, match="instruction=quest names a column the file does not have"):
        load_samples(path, columns={"instruction": "quest"}, fmt="alpaca")


def test_unknown_mapping_key_and_bad_syntax(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match="cannot map answer"):
        load_samples(path, columns={"answer": "output"})
    with pytest.raises(DataError, match="expected FIELD=COLUMN"):
        parse_columns("instruction")
    assert parse_columns(" instruction = q , output=a ,") == {"instruction": "q", "output": "a"}
