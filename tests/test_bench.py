"""The bench command end to end on a tiny model (not timed: speed goals live in the bench's own
table), and the pieces it is built from checked against hand-made numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_studio import bench
from lora_studio.cli import main
from lora_studio.data import Example
from tests.conftest import format_rows, write_jsonl

RESULT_FIELDS = {
    "steps", "train_s", "tokens", "tokens_per_s", "peak_mb", "final_loss", "eval_loss", "eval_token_acc",
    "eval_reply_acc", "curve", "trainable_params", "load_before", "load_after", "threads", "cpu_s",
}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_llama_dir):
    pytest.importorskip("peft")
    tmp = tmp_path_factory.mktemp("bench")
    data = write_jsonl(tmp / "rows.jsonl", format_rows(30))
    out = tmp / "out"
    code = main(["bench", "--model", tiny_llama_dir, "--data", str(data), "--out", str(out), "--rank", "4",
                 "--batch-size", "4", "--max-steps", "3", "--lr", "1e-2", "--eval-fraction", "0.2",
                 "--variants", "ours,ours-fp32,peft-fp32,peft-bf16", "--threads", "1"])
    return code, out, data


def test_bench_runs_every_variant_and_writes_table_json_plot(bench_run):
    code, out, _ = bench_run
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert list(report["results"]) == ["ours", "ours-fp32", "peft-bf16", "peft-fp32"]  # sorted keys
    for name, r in report["results"].items():
        assert "error" not in r, (name, r.get("error"))
        assert RESULT_FIELDS <= set(r), (name, RESULT_FIELDS - set(r))
        assert r["steps"] == 3 and len(r["curve"]) == 3
        assert r["train_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_mb"] > 50
        assert math.isfinite(r["eval_loss"]) and 0.0 <= r["eval_token_acc"] <= 1.0
        assert r["threads"] == 1
        # The elapsed times of the curve only grow, and the last is the train time.
        times = [t for t, _ in r["curve"]]
        assert times == sorted(times) and times[-1] == pytest.approx(r["train_s"], rel=0.05, abs=0.05)
    # The runs took turns: no two steps of different runs overlap in time.
    spans = sorted((a, b, name) for name, r in report["results"].items() for a, b in r["spans"])
    assert len(spans) == 12
    for (_, end, _), (start, _, _) in zip(spans, spans[1:]):
        assert start >= end - 1e-3
    assert len({name for _, _, name in spans[:4]}) == 4  # round robin: each run's first step comes first
    # Same job: same trainable parameter count for our LoRA and peft's, same held-out tokens.
    results = report["results"]
    assert results["ours"]["trainable_params"] == results["peft-fp32"]["trainable_params"]
    assert len({r["eval_tokens"] for r in results.values()}) == 1
    assert results["ours-fp32"]["precision"] == "float32" and results["peft-bf16"]["precision"] == "bfloat16"
    # Same batches, same init, both fp32: the two engines train the same adapter, step for step.
    ours_losses = [loss for _, loss in results["ours-fp32"]["curve"]]
    peft_losses = [loss for _, loss in results["peft-fp32"]["curve"]]
    assert ours_losses == pytest.approx(peft_losses, rel=1e-3)
    assert results["ours-fp32"]["eval_loss"] == pytest.approx(results["peft-fp32"]["eval_loss"], rel=1e-3)
    assert set(report["ratios"]) == {"peft-fp32", "peft-bf16"}
    assert report["ratios"]["peft-fp32"]["time"] == pytest.approx(
        results["ours"]["train_s"] / results["peft-fp32"]["train_s"])
    assert {"time <= 0.35x peft fp32", "time <= 0.7x peft bf16", "peak memory <= 0.8x peft fp32",
            "eval loss within 2% of peft fp32"} <= set(report["targets"])
    table = (out / "bench.md").read_text()
    for name in results:
        assert f"| {name} |" in table
    assert "ours / peft-fp32" in table and "tokens/s" in table and "peak memory" in table
    svg = (out / "bench_loss.svg").read_text()
    assert svg.count("<polyline") == 4
    assert (out / "bench_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_holds_out_the_same_rows_for_every_run(bench_run):
    _, out, data = bench_run
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 6 and len(train) == 24
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, train + held)) == sorted(map(key, rows))
    for name in ("ours", "peft-fp32"):
        spec = json.loads((out / name / "spec.json").read_text())
        assert spec["eval_file"] == str(out / "heldout.jsonl") and spec["train_file"] == str(out / "train.jsonl")


def test_methods_mode_has_a_row_per_registry_method(tmp_path, tiny_llama_dir):
    from lora_studio.methods import REGISTRY

    data = write_jsonl(tmp_path / "rows.jsonl", format_rows(20))
    out = tmp_path / "out"
    assert main(["bench", "--methods", "--model", tiny_llama_dir, "--data", str(data), "--out", str(out),
                 "--batch-size", "4", "--max-steps", "2", "--threads", "1"]) == 0
    report = json.loads((out / "methods.json").read_text())
    assert set(report["results"]) == set(REGISTRY)
    table = (out / "methods.md").read_text()
    for name, r in report["results"].items():
        assert f"| {name} |" in table
        if "error" not in r:
            assert r["steps"] == 2 and r["trainable_params"] > 0 and math.isfinite(r["final_loss"])
    assert "error" not in report["results"]["lora"]


def test_evaluate_counts_loss_and_accuracy_by_hand():
    """A fake model whose logits are fixed: loss and accuracies computed by hand."""
    vocab = 5

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            # Predicts token (input + 1) % vocab with logit 2, every other token 0.
            logits = torch.zeros(*input_ids.shape, vocab)
            logits.scatter_(-1, ((input_ids + 1) % vocab)[..., None], 2.0)
            return type("Out", (), {"logits": logits})()

    # Row 1: labels at positions 2, 3 -> targets 3 (right: 2+1) and 0 (wrong: 3+1=4).
    # Row 2: label at position 1 -> target 2, predicted from token 1 (right: 1+1).
    examples = [Example([1, 2, 3, 0], [-100, -100, 3, 0]), Example([1, 2, 3], [-100, 2, -100])]
    r = bench.evaluate(Fixed(), examples, pad_id=0, batch_size=2, device=torch.device("cpu"))
    right = -math.log(math.exp(2) / (math.exp(2) + 4))
    wrong = -math.log(1 / (math.exp(2) + 4))
    assert r["eval_loss"] == pytest.approx((2 * right + wrong) / 3)
    assert r["eval_token_acc"] == pytest.approx(2 / 3)
    assert r["eval_reply_acc"] == pytest.approx(1 / 2)
    assert r["eval_tokens"] == 3


def test_targets_are_judged_from_the_numbers():
    ours = {"train_s": 30.0, "peak_mb": 1000.0, "eval_loss": 1.01, "eval_token_acc": 0.9, "eval_tokens": 200}
    fp32 = {"train_s": 100.0, "peak_mb": 2000.0, "eval_loss": 1.0, "eval_token_acc": 0.9, "eval_tokens": 200}
    bf16 = {"train_s": 40.0, "peak_mb": 1900.0, "eval_loss": 1.0, "eval_token_acc": 0.9, "eval_tokens": 200}
    checks = bench.check_targets({"ours": ours, "peft-fp32": fp32, "peft-bf16": bf16})
    assert checks["time <= 0.35x peft fp32"] == {"value": 0.3, "met": True}
    assert checks["time <= 0.7x peft bf16"]["met"] is False  # 0.75
    assert checks["peak memory <= 0.8x peft fp32"]["met"] is True
    assert checks["eval loss within 2% of peft fp32"]["value"] == pytest.approx(0.01)
    worse = dict(ours, eval_loss=1.03, eval_token_acc=0.85)
    checks = bench.check_targets({"ours": worse, "peft-fp32": fp32})
    assert checks["eval loss within 2% of peft fp32"]["met"] is False
    assert checks["same held-out token accuracy as peft fp32"]["met"] is False
    assert bench.check_targets({"ours": {"error": "x"}, "peft-fp32": fp32}) == {}
    assert not any("same precision" in k for k in checks)  # ours in fp32: judged against fp32 only
    in_bf16 = dict(ours, precision="bfloat16", eval_loss=1.04)
    checks = bench.check_targets({"ours": in_bf16, "peft-fp32": fp32, "peft-bf16": dict(bf16, eval_loss=1.03)})
    assert checks["eval loss within 2% of peft fp32"]["met"] is False  # 4 % off fp32
    assert checks["eval loss within 2% of peft bf16 (same precision)"]["met"] is True  # 1 % off bf16


def test_unknown_variant_and_missing_peft_are_clear_errors(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", format_rows(4))
    assert main(["bench", "--data", str(data), "--out", str(tmp_path / "o"), "--variants", "ours,hf"]) == 2
    assert "unknown variant(s) hf" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert main(["bench", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "pip install -r requirements-dev.txt" in capsys.readouterr().err


def test_the_baseline_starts_from_our_adapter_init(tiny_llama_dir):
    peft = pytest.importorskip("peft")
    from lora_studio.config import TrainConfig
    from lora_studio.methods import adapter_layers, get_method, inject_adapters
    from lora_studio.models import load_model

    cfg = TrainConfig(data="x", out="x", rank=4, seed=3).resolved()
    ours = load_model(tiny_llama_dir)
    torch.manual_seed(cfg.seed)
    inject_adapters(ours, get_method("lora"), cfg)
    theirs = peft.get_peft_model(
        load_model(tiny_llama_dir),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert bench.same_init_as_ours(theirs, cfg.seed) == len(adapter_layers(ours)) == 14
    for name, layer in adapter_layers(ours).items():
        module = theirs.base_model.model.get_submodule(name)
        assert torch.equal(module.lora_A["default"].weight, layer.lora_A)
        assert torch.equal(module.lora_B["default"].weight, layer.lora_B)


def test_paired_step_ratio_ignores_a_step_slowed_by_the_machine():
    # Step times: ours 1, 1, 9 (slowed), 1; baseline 2, 2, 2, 2.
    ours = {"curve": [[1, 0.5], [2, 0.4], [11, 0.3], [12, 0.2]], "train_s": 12.0, "tokens_per_s": 10.0,
            "peak_mb": 1.0, "eval_loss": 1.0, "eval_token_acc": 0.5}
    base = {"curve": [[2, 0.5], [4, 0.4], [6, 0.3], [8, 0.2]], "train_s": 8.0, "tokens_per_s": 15.0,
            "peak_mb": 2.0, "eval_loss": 1.0, "eval_token_acc": 0.5}
    r = bench.ratios(ours, base)
    assert r["time"] == pytest.approx(1.5)
    assert r["time_paired_median"] == pytest.approx(0.5)  # ratios 0.5, 0.5, 4.5, 0.5
    assert r["memory"] == pytest.approx(0.5)
