"""Bake-off on a tiny model: two methods trained one after another through the runner, each
scored on the held-out split, one leaderboard row per method, and the overlaid loss plot."""

from __future__ import annotations

import csv
import json

import pytest

from lora_studio import bakeoff
from lora_studio.cli import main
from lora_studio.config import TrainConfig
from lora_studio.runner import Runner
from tests.conftest import format_rows, write_jsonl


def test_bakeoff_cli_one_row_per_method(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", format_rows(20))
    out = tmp_path / "bk"
    code = main(["bakeoff", "--data", str(data), "--methods", "lora,dora", "--out", str(out), "--model", tiny_llama_dir,
                 "--max-steps", "3", "--batch-size", "4", "--eval-every", "1", "--lr", "1e-2", "--max-new-tokens", "4",
                 "--checkpoint-every", "0"])
    assert code == 0, capsys.readouterr().err
    with (out / "leaderboard.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["method"] for r in rows) == ["dora", "lora"]
    assert list(rows[0]) == bakeoff.COLUMNS
    for r in rows:
        for col in ("eval_loss", "exact_match", "f1", "rougeL", "train_s", "tokens_per_s", "peak_mb", "trainable_params"):
            assert r[col] != "", (r["method"], col)
        config = json.loads((out / "runs" / r["run"] / "config.json").read_text())
        assert config["method"] == r["method"] and config["max_steps"] == 3 and config["seed"] == 0
        assert config["val_fraction"] == bakeoff.DEFAULT_VAL_FRACTION  # the same held-out split for every method
        scores = json.loads((out / "scores" / f"{r['method']}.json").read_text())
        assert scores["n"] == 4 and float(r["rougeL"]) == pytest.approx(scores["tuned"]["rougeL"], rel=1e-3)
    assert int(rows[0]["trainable_params"]) != int(rows[1]["trainable_params"])  # DoRA adds magnitudes
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "| method |" in (out / "leaderboard.md").read_text()


def test_bakeoff_refuses_bad_plans_before_any_run(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", format_rows(8))
    cfg = TrainConfig(data=str(data), model=tiny_llama_dir)
    with pytest.raises(ValueError, match="unknown method"):
        bakeoff.create(tmp_path / "a", cfg, "lora,nope")
    with pytest.raises(ValueError, match="different methods"):
        bakeoff.create(tmp_path / "b", cfg, "lora,lora")
    bad = write_jsonl(tmp_path / "test.jsonl", [*format_rows(1), {"instruction": "x", "input": ""}])
    with pytest.raises(ValueError, match=r"test.jsonl, row 2"):
        bakeoff.create(tmp_path / "c", cfg, "lora", test=str(bad))
    with pytest.raises(ValueError, match="rank"):
        bakeoff.create(tmp_path / "d", TrainConfig(data=str(data), rank=0), "lora")
    assert not any((tmp_path / d / bakeoff.BAKEOFF_FILE).exists() for d in "abcd")
    spec = bakeoff.create(tmp_path / "e", cfg, "vera,lora", test=str(data))
    assert spec["config"]["val_fraction"] == 0.0  # a test file: nothing held out of training
    assert bakeoff.method_config(spec["config"], "vera").resolved().rank != bakeoff.method_config(spec["config"], "lora").resolved().rank
    progress = bakeoff.progress(tmp_path / "e", Runner(tmp_path / "runs"))
    assert [q["state"] for q in progress["queue"]] == ["waiting", "waiting"] and not progress["finished"]
