"""Scoring by generation on a tiny trained run: batched greedy replies equal one-at-a-time
replies, scores match the replies, and the CLI writes the replies and the summary."""

from __future__ import annotations

import json

import pytest

from lora_studio.cli import main
from lora_studio.compare import TunedModel
from lora_studio.data import DataError
from lora_studio.evaluate import evaluate_run, reference_rows
from lora_studio.scoring import score
from tests.conftest import format_rows, write_jsonl


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("evalrun")
    data = write_jsonl(tmp / "train.jsonl", format_rows(32))
    run = tmp / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--model", tiny_llama_dir,
                 "--lr", "1e-2", "--epochs", "4", "--batch-size", "8", "--rank", "8"]) == 0
    return run


def test_reference_rows_from_a_training_file(tmp_path):
    rows = reference_rows(write_jsonl(tmp_path / "t.jsonl", format_rows(3)))
    assert rows[0] == {"prompt": "Say the word Paris", "reference": "ANSWER: Paris"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [*format_rows(2), {"instruction": "Say", "input": ""}])
    with pytest.raises(DataError, match=r"bad.jsonl, row 3"):
        reference_rows(bad)


def test_batched_replies_equal_single_replies_and_are_scored(trained_run, tmp_path):
    rows = reference_rows(write_jsonl(tmp_path / "test.jsonl", format_rows(8)))
    rows[1]["prompt"] = "Say the word fox, please, and nothing else at all"  # uneven lengths: left padding
    tm = TunedModel(trained_run)
    summary = evaluate_run(trained_run, rows, tmp_path / "scores.json", max_new_tokens=8, batch_size=3, model=tm)
    scored = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in scored] == [r["prompt"] for r in rows]
    settings = tm.generation
    settings.max_new_tokens = 8
    for r in scored:
        assert r["tuned"] == tm.reply(r["prompt"], tuned=True, settings=settings)
        assert r["base"] == tm.reply(r["prompt"], tuned=False, settings=settings)
        assert r["tuned_scores"] == score(r["tuned"], r["reference"])
    assert summary["n"] == 8
    assert summary["tuned"]["exact_match"] == pytest.approx(sum(r["tuned_scores"]["exact_match"] for r in scored) / 8)
    assert summary["tuned"]["rougeL"] > summary["base"]["rougeL"]  # the adapter learned "ANSWER: <word>"
    assert json.loads((tmp_path / "scores.json").read_text()) == summary


def test_evaluate_cli(trained_run, tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", format_rows(4))
    assert main(["evaluate", "--run", str(trained_run), "--data", str(data), "--out", str(tmp_path / "s.json"),
                 "--max-new-tokens", "6"]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["max_new_tokens"] == 6 and set(summary["base"]) == {"exact_match", "f1", "rougeL"}
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 4
    assert "tuned" in capsys.readouterr().out
    assert main(["evaluate", "--run", str(trained_run), "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
