"""Scores against values worked out by hand from the definitions in lora_studio/scoring.py."""

from __future__ import annotations

import pytest

from lora_studio.scoring import exact_match, lcs_length, mean_scores, rouge_l, score, squad_normalize, token_f1


def test_exact_match_strips_whitespace_only():
    assert exact_match("  ANSWER: fox \n", "ANSWER: fox") == 1.0
    assert exact_match("answer: fox", "ANSWER: fox") == 0.0  # case counts
    assert exact_match("ANSWER: fox.", "ANSWER: fox") == 0.0


def test_squad_normalize():
    assert squad_normalize("The  Cat, sat on a mat!") == "cat sat on mat"


@pytest.mark.parametrize(
    "reply, reference, expected",
    [
        ("The cat sat on the mat", "a cat sat", 2 / 3),  # 2 common of 4 and 2: P=1/2, R=1
        ("Paris, France!", "paris", 2 / 3),  # P=1/2, R=1
        ("fox fox dog", "fox dog dog", 2 / 3),  # bags: common = min counts = 1 fox + 1 dog
        ("fox", "dog", 0.0),
        ("", "", 1.0),
        ("", "dog", 0.0),
        ("the", "dog", 0.0),  # an article alone normalizes to nothing
    ],
)
def test_token_f1_by_hand(reply, reference, expected):
    assert token_f1(reply, reference) == pytest.approx(expected)


def test_lcs_length():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (CLRS 15.4)
    assert lcs_length([], list("abc")) == 0
    assert lcs_length(list("abc"), list("abc")) == 3


@pytest.mark.parametrize(
    "reply, reference, expected",
    [
        ("the cat sat on the mat", "the cat lay on the mat", 5 / 6),  # LCS "the cat on the mat"
        ("a b c d", "b d e", 4 / 7),  # LCS 2: P=1/2, R=2/3, F=2PR/(P+R)=4/7
        ("d c b a", "a b c d", 1 / 4),  # order matters: LCS 1
        ("Café crème!", "café", 2 / 3),  # non-ASCII words count (rouge-score would drop them)
        ("", "", 1.0),
        ("x", "", 0.0),
    ],
)
def test_rouge_l_by_hand(reply, reference, expected):
    assert rouge_l(reply, reference) == pytest.approx(expected)


def test_score_and_mean():
    rows = [score("ANSWER: fox", "ANSWER: fox"), score("ANSWER: dog", "ANSWER: fox")]
    assert rows[0] == {"exact_match": 1.0, "f1": 1.0, "rougeL": 1.0}
    assert rows[1] == {"exact_match": 0.0, "f1": 0.5, "rougeL": 0.5}
    assert mean_scores(rows) == {"exact_match": 0.5, "f1": 0.75, "rougeL": 0.75}
    assert mean_scores([]) == {"exact_match": None, "f1": None, "rougeL": None}
