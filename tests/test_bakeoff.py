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


class FakeRunner:
    """The runner calls advance() makes: start (recorded), status, run_dir, metrics."""

    def __init__(self, root):
        self.root, self.started, self.states = root, [], {}

    def start(self, cfg, run_id, owner=None, max_wall_s=None):
        self.started.append((run_id, cfg.method, owner))
        self.states[run_id] = "running"
        return run_id

    def status(self, run_id):
        return {"state": self.states[run_id], "run_id": run_id}

    def run_dir(self, run_id):
        return self.root / run_id

    def stop(self, run_id, save=True):
        self.stopped = (run_id, save)


def test_advance_all_starts_one_method_at_a_time_within_the_caps(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", format_rows(8))
    cfg = TrainConfig(data=str(data), model=tiny_llama_dir)
    root, runner = tmp_path / "bakeoffs", FakeRunner(tmp_path / "runs")
    bakeoff.create(root / "bk20990101-000000-aaaa", cfg, "lora,vera", owner="anon-a", bk_id="bk20990101-000000-aaaa")
    bakeoff.create(root / "bk20990101-000000-bbbb", cfg, "dora", owner="anon-b", bk_id="bk20990101-000000-bbbb")
    allowed = {"anon-a"}
    assert bakeoff.advance_all(root, runner, lambda owner: owner in allowed) == ["bk20990101-000000-aaaa", "bk20990101-000000-bbbb"]
    assert runner.started == [("bk20990101-000000-aaaa-lora", "lora", "anon-a")]  # anon-b is over its cap for now
    bakeoff.advance_all(root, runner, lambda owner: owner in allowed)
    assert len(runner.started) == 1  # lora still running: vera waits
    runner.states["bk20990101-000000-aaaa-lora"] = "failed"  # over without an adapter: no score, next method
    allowed.add("anon-b")
    bakeoff.advance_all(root, runner, lambda owner: True)
    assert [s[0] for s in runner.started[1:]] == ["bk20990101-000000-aaaa-vera", "bk20990101-000000-bbbb-dora"]
    bakeoff.cancel(root / "bk20990101-000000-bbbb", runner)
    assert runner.stopped == ("bk20990101-000000-bbbb-dora", True)  # stopped with its adapter kept
    runner.states["bk20990101-000000-bbbb-dora"] = "failed"
    assert bakeoff.progress(root / "bk20990101-000000-bbbb", runner)["finished"]
    bakeoff.advance_all(root, runner)
    assert bakeoff.load(root / "bk20990101-000000-bbbb").get("finished_at")  # skipped from now on
    assert bakeoff.advance_all(root, runner) == ["bk20990101-000000-aaaa"]


def test_bakeoff_scores_on_a_test_file_and_early_stops_on_its_rouge(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", format_rows(16))
    test = write_jsonl(tmp_path / "test.jsonl", format_rows(3))
    out = tmp_path / "bk"
    assert main(["bakeoff", "--data", str(data), "--test", str(test), "--methods", "lora", "--out", str(out),
                 "--model", tiny_llama_dir, "--epochs", "3", "--max-steps", "10", "--batch-size", "8", "--eval-every", "1",
                 "--early-stop", "1", "--probe-max-new-tokens", "3", "--max-new-tokens", "3", "--checkpoint-every", "0"]) == 0
    with (out / "leaderboard.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    config = json.loads((out / "runs" / row["run"] / "config.json").read_text())
    assert config["test_data"] == str(test) and config["val_fraction"] == 0.0  # nothing held out of training
    status = json.loads((out / "runs" / row["run"] / "status.json").read_text())
    assert status["watched"] == "rougeL" and status["step"] < 10 and "early stop" in status["stop_reason"]
    assert json.loads((out / "scores" / "lora.json").read_text())["n"] == 3  # scored on the test file
    assert row["eval_loss"] == "" and row["rougeL"] != ""  # no validation data: no eval loss
