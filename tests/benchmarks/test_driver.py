"""`python -m benchmarks` end to end on a tiny model (not timed: speed goals live in the bench's
own table): every variant, the methods mode, bad input, and a worker that dies."""

from __future__ import annotations

import json
import math
import time

import pytest

from benchmarks.driver import main, run_variants
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
    code = main(["--model", tiny_llama_dir, "--data", str(data), "--out", str(out), "--rank", "4",
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
    assert results["ours"]["compile"].startswith("auto: ") and "compile" not in results["peft-fp32"]
    # Same batches, same init, both fp32: the two engines train the same adapter, step for step.
    ours_losses = [loss for _, loss in results["ours-fp32"]["curve"]]
    peft_losses = [loss for _, loss in results["peft-fp32"]["curve"]]
    assert ours_losses == pytest.approx(peft_losses, rel=1e-3)
    assert results["ours-fp32"]["eval_loss"] == pytest.approx(results["peft-fp32"]["eval_loss"], rel=1e-3)
    assert set(report["ratios"]) == {"peft-fp32", "peft-bf16"}
    assert report["ratios"]["peft-fp32"]["time"] == pytest.approx(
        results["ours"]["train_s"] / results["peft-fp32"]["train_s"])
    assert {"time <= 0.35x peft fp32", "time <= 0.5x peft bf16", "peak memory <= 0.75x peft fp32", "tokens/s >= 1000 (ours)",
            "eval loss within 2% of peft fp32"} <= set(report["targets"])
    table = (out / "bench.md").read_text()
    for name in results:
        assert f"| {name} |" in table
    assert f"- ours: compile {results['ours']['compile']}" in table
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
    assert main(["--methods", "--model", tiny_llama_dir, "--data", str(data), "--out", str(out),
                 "--batch-size", "4", "--max-steps", "2", "--threads", "1"]) == 0
    report = json.loads((out / "methods.json").read_text())
    assert set(report["results"]) == set(REGISTRY)
    table = (out / "methods.md").read_text()
    for name, r in report["results"].items():
        assert f"| {name} |" in table
        if "error" not in r:
            assert f"| {name} | {r['precision']} |" in table
            assert r["steps"] == 2 and r["trainable_params"] > 0 and math.isfinite(r["final_loss"])
    assert "error" not in report["results"]["lora"]


def test_unknown_variant_and_missing_peft_are_clear_errors(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", format_rows(4))
    assert main(["--data", str(data), "--out", str(tmp_path / "o"), "--variants", "ours,hf"]) == 2
    assert "unknown variant(s) hf" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert main(["--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "pip install -r requirements-dev.txt" in capsys.readouterr().err


def test_a_worker_that_dies_is_reported_without_waiting_for_the_timeout(tmp_path):
    # "threads" that is not a number kills the worker before it says "ready" or writes a result.
    spec = {"variant": "ours", "label": "dead", "threads": "many", "out": str(tmp_path / "dead")}
    t0 = time.monotonic()
    results = run_variants([spec], timeout=120.0)
    assert time.monotonic() - t0 < 60  # noticed the dead process, did not sit out the timeout
    assert "no result" in results["dead"]["error"] and "code 1" in results["dead"]["error"]


def test_qlora_variants_each_train_over_a_4bit_base(tmp_path, tokenizer):
    """ours-qlora (quantize: 4bit) against peft + bitsandbytes' recipe, for a GPU; here the
    plumbing on the CPU backend of bitsandbytes (whose inference path needs rows of at least
    one 64-number block: a tiny model 64 wide)."""
    pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_studio.methods.qlora import bitsandbytes_problem

    if bitsandbytes_problem():
        pytest.skip(bitsandbytes_problem())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "rows.jsonl", format_rows(20))
    out = tmp_path / "out"
    code = main(["--model", str(model_dir), "--data", str(data), "--out", str(out), "--rank", "4",
                 "--batch-size", "4", "--max-steps", "2", "--eval-fraction", "0.2",
                 "--variants", "ours-qlora,peft-qlora", "--threads", "1"])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    for name in ("ours-qlora", "peft-qlora"):
        assert "error" not in report["results"][name], report["results"][name].get("error")
        assert report["results"][name]["steps"] == 2
    assert report["results"]["peft-qlora"]["precision"].startswith("nf4 + ")
    assert report["results"]["ours-qlora"]["trainable_params"] == report["results"]["peft-qlora"]["trainable_params"]
    assert set(report["ratios"]) == {"ours-qlora / peft-qlora"}
    assert "| ours-qlora / peft-qlora |" in (out / "bench.md").read_text()
