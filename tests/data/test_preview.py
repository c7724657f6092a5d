"""Preview for the UI and `inspect`: first rows, rendered samples with trained spans and a
visible EOS, length statistics, histogram, truncation count; unreadable data gives a report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_studio.data import inspect_data, length_histogram, length_stats, load_examples, sample_spans, spans_text

Q, A = "What is the capital of France?", "Paris is the capital."


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sample_spans_mark_the_reply_and_its_eos(tmp_path, tokenizer):
    (example,), _ = load_examples(jsonl(tmp_path / "a.jsonl", [{"instruction": Q, "output": A}]), tokenizer)
    spans = sample_spans(tokenizer, example)
    assert "".join(text for text, _ in spans) == tokenizer.decode(example.input_ids)
    assert [text for text, trained in spans if trained] == [A + "<|im_end|>"]
    assert spans[0] == ("<|im_start|>user\n" + Q + "<|im_end|>\n<|im_start|>assistant\n", False)
    assert spans_text(spans).endswith(f"[[{A}<|im_end|>]]\n")


def test_multi_turn_spans_alternate(tmp_path, tokenizer):
    turns = [
        {"role": "user", "content": Q},
        {"role": "assistant", "content": A},
        {"role": "user", "content": "And Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
    (example,), _ = load_examples(jsonl(tmp_path / "m.jsonl", [{"messages": turns}]), tokenizer)
    spans = sample_spans(tokenizer, example)
    assert [trained for _, trained in spans] == [False, True, False, True, False]
    assert [text for text, trained in spans if trained] == [A + "<|im_end|>", "Madrid.<|im_end|>"]


def test_length_stats_and_histogram(tmp_path, tokenizer):
    rows = [{"instruction": Q, "output": "word " * n} for n in (1, 5, 10, 40)]
    examples, _ = load_examples(jsonl(tmp_path / "a.jsonl", rows), tokenizer, max_seq_len=40)
    lengths = np.array([e.full_length for e in examples])
    stats = length_stats(examples, 40)
    assert stats["n"] == 4 and stats["max"] == lengths.max() and stats["min"] == lengths.min()
    assert stats["median"] == pytest.approx(np.median(lengths))
    assert stats["n_truncated"] == int((lengths > 40).sum()) == 1
    assert stats["trained_tokens"] == sum(e.n_trained for e in examples)
    hist = length_histogram(examples, bins=5)
    assert list(hist.columns) == ["bin_start", "bin_end", "count"]
    assert hist["count"].sum() == 4 and len(hist) == 5
    assert hist["bin_start"].iloc[0] == lengths.min() and hist["bin_end"].iloc[-1] == lengths.max()


def test_inspect_data_for_the_ui(tmp_path, tokenizer):
    rows = [{"instruction": f"{Q} {i}", "output": A} for i in range(30)] + [{"instruction": "x", "output": ""}]
    preview = inspect_data(jsonl(tmp_path / "a.jsonl", rows), tokenizer, max_seq_len=64, n_rows=10, n_samples=2)
    assert preview.rows.shape == (10, 3) and list(preview.rows.columns) == ["row", "instruction", "output"]
    assert preview.rows["row"].tolist() == list(range(1, 11))
    assert [(p.row, p.field, p.kind) for p in preview.report.problems] == [(31, "output", "empty_field")]
    assert not preview.report.ok
    assert preview.sample_rows == [1, 2] and len(preview.samples) == 2
    assert preview.stats["n"] == 30 and preview.histogram["count"].sum() == 30
    text = preview.text()
    assert "31 rows, format alpaca (detected)" in text and "--- row 1" in text and f"[[{A}<|im_end|>]]" in text


def test_inspect_data_never_raises_for_bad_data(tmp_path, tokenizer):
    path = tmp_path / "qa.csv"
    path.write_text("Question,Answer\nhi,there\n")
    preview = inspect_data(path, tokenizer, name="qa.csv")
    (problem,) = preview.report.problems
    assert (problem.file, problem.kind) == ("qa.csv", "unknown_format")
    assert preview.samples == [] and "--columns instruction=Question,output=Answer" in preview.text()
    missing = inspect_data(tmp_path / "nope.jsonl")
    assert missing.report.problems[0].kind == "unreadable" and not missing.report.ok


def test_inspect_without_tokenizer_validates_structure_only(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nhi,there\nwhat,\n")
    preview = inspect_data(path, columns={"instruction": "question", "output": "answer"})
    assert preview.rows["row"].tolist() == [2, 3]
    assert [(p.row, p.field) for p in preview.report.problems] == [(3, "answer")]
    assert preview.samples == [] and preview.stats == {}
