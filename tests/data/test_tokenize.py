"""Label masking: for every format, the tokens that carry loss are exactly the assistant
replies, each followed by its EOS; every assistant turn of a conversation is trained."""

from __future__ import annotations

import copy
import json

import pytest

from lora_studio.data import (
    IGNORE_INDEX,
    DataError,
    ensure_chat_template,
    load_conversations,
    load_examples,
    tokenize_all,
)
from lora_studio.models import DEFAULT_CHAT_TEMPLATE

Q1, A1 = "What is the capital of France?", "Paris is the capital."
Q2, A2 = "Which animal jumps over the lazy dog?", "The quick brown fox."


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_files(tmp_path) -> dict[str, tuple[object, dict, list[list[str]]]]:
    """format -> (path, load options, replies of each row)."""
    csv = tmp_path / "qa.csv"
    csv.write_text(f"question,answer\n{Q1},{A1}\n{Q2},{A2}\n")
    two_turns = [
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": Q2},
        {"role": "assistant", "content": A2},
    ]
    return {
        "alpaca": (jsonl(tmp_path / "a.jsonl", [{"instruction": Q1, "input": "", "output": A1}]), {}, [[A1]]),
        "messages": (jsonl(tmp_path / "m.jsonl", [{"messages": two_turns}]), {}, [[A1, A2]]),
        "sharegpt": (
            jsonl(
                tmp_path / "s.json",
                [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]}],
            ),
            {},
            [[A2]],
        ),
        "prompt-completion": (jsonl(tmp_path / "p.jsonl", [{"prompt": Q2, "completion": A2}]), {}, [[A2]]),
        "csv-mapped": (csv, {"columns": {"instruction": "question", "output": "answer"}}, [[A1], [A2]]),
        "system-prompt": (jsonl(tmp_path / "sp.jsonl", [{"instruction": Q1, "output": A1}]), {"system_prompt": "Be brief."}, [[A1]]),
    }


def trained_ids(example) -> list[int]:
    for token, label in zip(example.input_ids, example.labels):
        assert label in (IGNORE_INDEX, token), "a label must be the token itself or ignored"
    return [label for label in example.labels if label != IGNORE_INDEX]


def expected_ids(tokenizer, replies: list[str]) -> list[int]:
    out: list[int] = []
    for reply in replies:
        out += tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


def no_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    ensure_chat_template(tok)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("template", ["chatml", "default"])
@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt", "prompt-completion", "csv-mapped", "system-prompt"])
def test_loss_is_exactly_the_replies_and_their_eos(tmp_path, tokenizer, fmt, template):
    tok = tokenizer if template == "chatml" else no_template(tokenizer)
    path, options, replies = write_files(tmp_path)[fmt]
    examples, report = load_examples(path, tok, max_seq_len=256, **options)
    assert report.ok and len(examples) == len(replies)
    for example, row_replies in zip(examples, replies):
        assert trained_ids(example) == expected_ids(tok, row_replies)
        prompt_text = tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab == IGNORE_INDEX])
        for reply in row_replies:
            assert reply not in prompt_text  # no reply token is masked away


def test_every_assistant_turn_is_trained_and_ends_in_eos(tmp_path, tokenizer):
    path, options, _ = write_files(tmp_path)["messages"]
    (example,), _ = load_examples(path, tokenizer, **options)
    eos = tokenizer.eos_token_id
    eos_positions = [i for i, lab in enumerate(example.labels) if lab == eos]
    assert len(eos_positions) == 2  # one per assistant turn
    # the user's second question, between the two replies, is masked
    between = example.input_ids[eos_positions[0] + 1 : eos_positions[1]]
    labels_between = example.labels[eos_positions[0] + 1 : eos_positions[1]]
    assert Q2 in tokenizer.decode(between)
    q2_start = next(i for i in range(len(between)) if Q2 in tokenizer.decode(between[: i + 1]))
    assert all(lab == IGNORE_INDEX for lab in labels_between[: q2_start + 1])


def test_text_format_trains_every_token_and_appends_eos(tmp_path, tokenizer):
    path = jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox jumps over the lazy dog"}])
    (example,), report = load_examples(path, tokenizer)
    ids = tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"] + [tokenizer.eos_token_id]
    assert report.format == "text"
    assert example.input_ids == ids
    assert example.labels == [IGNORE_INDEX] + ids[1:]


def test_truncation_keeps_the_prefix_and_records_the_length(tmp_path, tokenizer):
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": Q1, "output": A1 + " " + A1}])
    (full,), _ = load_examples(path, tokenizer, max_seq_len=256)
    (cut,), _ = load_examples(path, tokenizer, max_seq_len=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    assert cut.truncated and cut.full_length == len(full.input_ids) and not full.truncated


NOT_INCREMENTAL = "{% for m in messages|reverse %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
)


@pytest.mark.parametrize(
    ("template", "words"), [(NOT_INCREMENTAL, "does not render conversations incrementally"), (NO_SYSTEM, "System role not supported")]
)
def test_template_problems_name_the_row(tmp_path, tokenizer, template, words):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": Q1, "output": A1}, {"instruction": Q2, "output": A2}])
    with pytest.raises(DataError) as e:
        load_examples(path, tok, system_prompt="Be brief.")
    assert [(p.row, p.kind) for p in e.value.problems] == [(1, "template"), (2, "template")]
    assert words in str(e.value)


def test_old_api_still_works(tmp_path, tokenizer):
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": Q1, "output": A1}, {"instruction": Q2, "output": A2}])
    conversations = load_conversations(path, system_prompt="Be brief.")
    assert conversations[0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": A1},
    ]
    examples = tokenize_all(tokenizer, conversations, 256)
    assert trained_ids(examples[1]) == expected_ids(tokenizer, [A2])
    with pytest.raises(DataError, match=r"row 1, field 'output': empty"):
        load_conversations(jsonl(tmp_path / "b.jsonl", [{"instruction": Q1, "output": ""}]))


@pytest.mark.slow
def test_bundled_model_template_masks_multi_turn(tmp_path):
    from lora_studio.models import load_tokenizer

    tok = load_tokenizer("bundled")
    path, options, replies = write_files(tmp_path)["messages"]
    (example,), _ = load_examples(path, tok, **options)
    assert trained_ids(example) == expected_ids(tok, replies[0])
