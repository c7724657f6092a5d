"""Scores a `compare` output on the held-out prompts of the JSON-answers example:
for base and tuned, how many replies are valid {"answer": ...} JSON and how many are right.

    python -m lora_studio compare --run RUN --prompts examples/json_answers_heldout.jsonl --out OUT.jsonl
    python examples/score_json_answers.py OUT.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELD_OUT = Path(__file__).with_name("json_answers_heldout.jsonl")


def parse(reply: str) -> str | None:
    try:
        value = json.loads(reply)
    except json.JSONDecodeError:
        return None
    return str(value["answer"]) if isinstance(value, dict) and "answer" in value else None


def score(rows: list[dict], expected: dict[str, str]) -> dict[str, dict[str, int]]:
    result = {}
    for side in ("base", "tuned"):
        answers = [parse(r[side]) for r in rows]
        result[side] = {
            "format": sum(a is not None for a in answers),
            "correct": sum(a is not None and a.strip().lower() == expected[r["prompt"]].lower() for a, r in zip(answers, rows)),
            # Fair to the base model: is the right answer anywhere in the reply, format aside?
            "mentions": sum(expected[r["prompt"]].lower() in r[side].lower() for r in rows),
            "total": len(rows),
        }
    return result


def main(path: str) -> None:
    expected = {json.loads(x)["prompt"]: json.loads(x)["expected"] for x in HELD_OUT.read_text().splitlines()}
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    print("| model | valid JSON format | correct JSON answer | right answer anywhere in reply |\n|---|---|---|---|")
    for side, s in score(rows, expected).items():
        t = s["total"]
        print(f"| {side} | {s['format']}/{t} | {s['correct']}/{t} | {s['mentions']}/{t} |")


if __name__ == "__main__":
    main(sys.argv[1])
