"""ROUGE-L against Google's `rouge-score` package (the reference implementation, a test-only
dependency) on ASCII text, where its tokenizer and ours agree: lower case, runs of [a-z0-9]."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_studio.scoring import rouge_l

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

WORDS = ["the", "cat", "Sat", "on", "mat", "ANSWER:", "42", "fox", "dog,", "2026-12-02", "a_b", "x"]
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(reply=texts, reference=texts)
def test_rouge_l_equals_rouge_score(reply: str, reference: str) -> None:
    oracle = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, reply)["rougeL"]
    assert rouge_l(reply, reference) == pytest.approx(oracle.fmeasure, abs=1e-12)
