"""The bench's report: targets and ratios judged from hand-made numbers."""

from __future__ import annotations

import pytest

from benchmarks import report


def test_targets_are_judged_from_the_numbers():
    ours = {"train_s": 30.0, "peak_mb": 1000.0, "eval_loss": 1.01, "eval_token_acc": 0.9, "eval_tokens": 200}
    fp32 = {"train_s": 100.0, "peak_mb": 2000.0, "eval_loss": 1.0, "eval_token_acc": 0.9, "eval_tokens": 200}
    bf16 = {"train_s": 55.0, "peak_mb": 1900.0, "eval_loss": 1.0, "eval_token_acc": 0.9, "eval_tokens": 200}
    checks = report.check_targets({"ours": ours, "peft-fp32": fp32, "peft-bf16": bf16})
    assert checks["time <= 0.35x peft fp32"] == {"value": 0.3, "met": True}
    assert checks["time <= 0.5x peft bf16"]["met"] is False  # 0.545
    assert checks["peak memory <= 0.75x peft fp32"]["met"] is True  # 0.5
    assert "tokens/s >= 1000 (ours)" not in checks  # no tokens/s given: not judged
    fast = dict(ours, tokens_per_s=1200.0, peak_mb=1600.0)
    checks = report.check_targets({"ours": fast, "peft-fp32": fp32})
    assert checks["tokens/s >= 1000 (ours)"] == {"value": 1200.0, "met": True}
    assert checks["peak memory <= 0.75x peft fp32"]["met"] is False  # 0.8
    assert report.check_targets({"ours": dict(ours, tokens_per_s=999.0)})["tokens/s >= 1000 (ours)"]["met"] is False
    assert checks["eval loss within 2% of peft fp32"]["value"] == pytest.approx(0.01)
    worse = dict(ours, eval_loss=1.03, eval_token_acc=0.85)
    checks = report.check_targets({"ours": worse, "peft-fp32": fp32})
    assert checks["eval loss within 2% of peft fp32"]["met"] is False
    assert checks["same held-out token accuracy as peft fp32"]["met"] is False
    assert report.check_targets({"ours": {"error": "x"}, "peft-fp32": fp32}) == {}
    assert not any("same precision" in k for k in checks)  # ours in fp32: judged against fp32 only
    in_bf16 = dict(ours, precision="bfloat16", eval_loss=1.04)
    checks = report.check_targets({"ours": in_bf16, "peft-fp32": fp32, "peft-bf16": dict(bf16, eval_loss=1.03)})
    assert checks["eval loss within 2% of peft fp32"]["met"] is False  # 4 % off fp32
    assert checks["eval loss at most 2% above peft bf16 (same precision)"]["met"] is True  # 1 % above bf16
    checks = report.check_targets({"ours": in_bf16, "peft-fp32": fp32, "peft-bf16": dict(bf16, eval_loss=1.07)})
    assert checks["eval loss at most 2% above peft bf16 (same precision)"]["met"] is True  # 3 % below: better
    checks = report.check_targets({"ours": in_bf16, "peft-fp32": fp32, "peft-bf16": dict(bf16, eval_loss=1.01)})
    assert checks["eval loss at most 2% above peft bf16 (same precision)"]["met"] is False  # 3 % above


def test_paired_step_ratio_ignores_a_step_slowed_by_the_machine():
    # Step times: ours 1, 1, 9 (slowed), 1; baseline 2, 2, 2, 2.
    ours = {"curve": [[1, 0.5], [2, 0.4], [11, 0.3], [12, 0.2]], "train_s": 12.0, "tokens_per_s": 10.0,
            "peak_mb": 1.0, "eval_loss": 1.0, "eval_token_acc": 0.5}
    base = {"curve": [[2, 0.5], [4, 0.4], [6, 0.3], [8, 0.2]], "train_s": 8.0, "tokens_per_s": 15.0,
            "peak_mb": 2.0, "eval_loss": 1.0, "eval_token_acc": 0.5}
    r = report.ratios(ours, base)
    assert r["time"] == pytest.approx(1.5)
    assert r["time_paired_median"] == pytest.approx(0.5)  # ratios 0.5, 0.5, 4.5, 0.5
    assert r["memory"] == pytest.approx(0.5)
