"""Scores of a generated reply against a reference: exact match, token F1, ROUGE-L.

Written here rather than taken from a package: `rouge-score` (the usual ROUGE library) pulls
in nltk and its tokenizer drops every non-ASCII character (a French or Chinese reference would
score 0 or 1 on nothing), and SQuAD's F1 is a dozen lines in the SQuAD evaluation script itself.
The definitions follow those references exactly:

- exact match: 1 when the reply equals the reference after stripping surrounding whitespace.
- token F1 (SQuAD v1.1 `evaluate-v1.1.py`): both texts normalized (lower case, punctuation and
  the articles a/an/the removed, whitespace collapsed) and split on whitespace; with `common`
  the size of the multiset intersection of the two token bags,
  P = common / len(reply), R = common / len(reference), F1 = 2PR / (P + R) (0 when common = 0).
- ROUGE-L (Lin 2004, the sentence-level F-measure `rouge-score` reports with beta = 1): both
  texts lower-cased and split into runs of letters/digits (Unicode-aware, unlike rouge-score's
  ASCII-only tokenizer); with LCS the length of their longest common subsequence of tokens,
  P = LCS / len(reply), R = LCS / len(reference), F = 2PR / (P + R).

Two empty texts score 1 on F1 and ROUGE-L (they agree), one empty text 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable

METRICS = ("exact_match", "f1", "rougeL")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script


def squad_normalize(text: str) -> str:
    """SQuAD's `normalize_answer`: lower, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(reply: str, reference: str) -> float:
    return float(reply.strip() == reference.strip())


def _f_measure(common: int, n_reply: int, n_reference: int) -> float:
    if n_reply == 0 or n_reference == 0:
        return float(n_reply == n_reference)
    if common == 0:
        return 0.0
    p, r = common / n_reply, common / n_reference
    return 2 * p * r / (p + r)


def token_f1(reply: str, reference: str) -> float:
    """SQuAD token F1 (see the module docstring)."""
    a, b = squad_normalize(reply).split(), squad_normalize(reference).split()
    common = sum((Counter(a) & Counter(b)).values())
    return _f_measure(common, len(a), len(b))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence of two token lists, O(len(a) * len(b)) time, O(len(b)) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge_l(reply: str, reference: str) -> float:
    """ROUGE-L F-measure (see the module docstring)."""
    a, b = rouge_tokens(reply), rouge_tokens(reference)
    return _f_measure(lcs_length(a, b), len(a), len(b))


def score(reply: str, reference: str) -> dict[str, float]:
    return {"exact_match": exact_match(reply, reference), "f1": token_f1(reply, reference), "rougeL": rouge_l(reply, reference)}


def mean_scores(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over the rows (0 rows: every metric None)."""
    rows = list(rows)
    return {m: (sum(r[m] for r in rows) / len(rows) if rows else None) for m in METRICS}  # type: ignore[misc]
