"""`python -m benchmarks.curves` end to end on a tiny random shape (not timed: the numbers go
in docs/bench.md): the points, equal rows, the table."""

from __future__ import annotations

import json

import pytest

from benchmarks import curves


def test_curves_train_each_point_both_ways_on_rows_of_equal_length(tmp_path, tiny_llama_dir, monkeypatch):
    pytest.importorskip("peft")
    tiny = dict(arch="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=400, rope_theta=10000.0)
    monkeypatch.setitem(curves.SHAPES, "tiny", tiny)
    code = curves.main(["--points", "tiny:2:64,tiny:3:80", "--steps", "3", "--variants", "ours,peft-fp32",
                        "--out", str(tmp_path / "out"), "--models", str(tmp_path / "models"),
                        "--tokenizer", tiny_llama_dir, "--threads", "1"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert [(p["batch"], p["seq"]) for p in report["points"]] == [(2, 64), (3, 80)]
    for point in report["points"]:
        for name, run in point["runs"].items():
            assert "error" not in run, (name, run)
            assert run["steps"] == 3
            # Rows cut at the point's length, no padding: batch × seq real tokens every step.
            assert run["tokens_per_step"] == point["batch"] * point["seq"]
            assert run["tokens_per_s"] > 0 and run["peak_mb"] > 50
    assert (tmp_path / "models" / "tiny" / "config.json").exists()  # built once, reused
    table = (tmp_path / "out" / "curves.md").read_text()
    assert "| tiny | 3 | 80 |" in table and "ours/peft-fp32 tok/s" in table


def test_the_table_shows_ratios_and_failures():
    points = [{"sweep": "seq", "shape": "135M", "batch": 1, "seq": 64,
               "runs": {"ours": {"tokens_per_s": 300.0, "peak_mb": 1000.0},
                        "peft-fp32": {"tokens_per_s": 100.0, "peak_mb": 2000.0}}},
              {"sweep": "seq", "shape": "135M", "batch": 1, "seq": 128,
               "runs": {"ours": {"error": "boom"}, "peft-fp32": {"tokens_per_s": 90.0, "peak_mb": 2100.0}}}]
    table = curves.markdown(points, ["ours", "peft-fp32"])
    assert "| 135M | 1 | 64 | 300 | 100 | 1000 | 2000 | 3.00x | 0.50x |" in table
    assert "| 135M | 1 | 128 | failed | 90 | failed | 2100 | - | - |" in table
