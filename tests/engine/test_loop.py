"""The training loop in-process: bit-exact resume, stop/abort, checkpoints, accumulation,
gradient checkpointing, eval loss, failures with human messages."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import lora_studio.engine.run as run_mod
from lora_studio.engine.checkpoint import latest_checkpoint, list_checkpoints
from lora_studio.config import TrainConfig
from lora_studio.data import collate
from lora_studio.runfiles import read_metrics, read_status, request_stop
from lora_studio.engine.loop import Trainer, enable_gradient_checkpointing, prepare
from lora_studio.engine.loss import causal_lm_loss
from lora_studio.engine.plan import make_plan
from lora_studio.engine.run import train
from tests.conftest import format_rows, write_jsonl
from tests.engine.test_memory import measured_saved_bytes


def make_cfg(out, model_dir, data, **kw) -> TrainConfig:
    # fp32 unless a test says otherwise: these tests assert equalities, and `auto` picks bf16 on
    # CPUs with fast bf16 (AMD Zen 4, AMX). bf16 has its own tests below, with tolerances.
    base = dict(data=str(data), out=str(out), model=model_dir, rank=4, batch_size=5, epochs=3, checkpoint_every=0,
                eval_every=0, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)]


def adapter_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def stop_after(run_dir, n: int):
    return lambda: len(read_metrics(run_dir)) >= n


@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_stop_then_resume_gives_the_same_losses_as_one_run(tiny_model_dir, train_file, tmp_path, checkpoint_every):
    # 24 rows / batch 5 = 5 batches an epoch: the stop falls in the second epoch (its data order
    # comes from the generator state of that epoch) and the resumed part crosses into the third.
    # Dropout > 0 makes the result depend on the RNG state being restored too.
    kw = dict(max_steps=12, dropout=0.1, checkpoint_every=checkpoint_every)
    straight = train(make_cfg(tmp_path / "a", tiny_model_dir, train_file, **kw))
    assert straight["state"] == "done" and straight["step"] == 12

    first = train(make_cfg(tmp_path / "b", tiny_model_dir, train_file, **kw), should_stop=stop_after(tmp_path / "b", 7))
    assert first["state"] == "stopped" and first["step"] == 7
    kept = ["step-000006", "step-000007"] if checkpoint_every else ["step-000007"]
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == kept  # the two newest; older ones deleted
    second = train(TrainConfig.load(tmp_path / "b" / "config.json"), resume=True)
    assert second["state"] == "done" and second["step"] == 12 and second["resumed_from"] == 7

    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(1, 13))
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # exactly, not approximately
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_crash_resumes_from_the_last_periodic_checkpoint(tiny_llama_dir, train_file, tmp_path):
    kw = dict(max_steps=6, checkpoint_every=2)
    train(make_cfg(tmp_path / "a", tiny_llama_dir, train_file, **kw))

    def crash(row):
        if row["step"] == 5:
            raise RuntimeError("simulated crash in step 5")

    crashed = train(make_cfg(tmp_path / "b", tiny_llama_dir, train_file, **kw), on_step=crash)
    assert crashed["state"] == "failed" and "simulated crash" in crashed["error"]
    assert latest_checkpoint(tmp_path / "b").name == "step-000004"
    resumed = train(TrainConfig.load(tmp_path / "b" / "config.json"), resume=True)
    assert resumed["state"] == "done" and resumed["resumed_from"] == 4
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_incomplete_checkpoints_are_ignored(tiny_llama_dir, train_file, tmp_path):
    train(make_cfg(tmp_path, tiny_llama_dir, train_file, max_steps=4, checkpoint_every=2))
    (tmp_path / "checkpoints" / "step-000009.tmp").mkdir()  # a save killed before its rename
    (tmp_path / "checkpoints" / "step-000010").mkdir()  # a folder without state.json
    assert latest_checkpoint(tmp_path).name == "step-000002"


def test_stop_request_file_saves_adapter_and_checkpoint(tiny_llama_dir, train_file, tmp_path):
    def ask_stop(row):
        if row["step"] == 2:
            request_stop(tmp_path, save=True)

    status = train(make_cfg(tmp_path, tiny_llama_dir, train_file, max_steps=6), on_step=ask_stop)
    assert status["state"] == "stopped" and status["step"] == 2
    assert json.loads((tmp_path / "adapter" / "lora_studio.json").read_text())["step"] == 2
    assert latest_checkpoint(tmp_path).name == "step-000002"


def test_abort_saves_nothing(tiny_llama_dir, train_file, tmp_path):
    def ask_abort(row):
        if row["step"] == 2:
            request_stop(tmp_path, save=False)

    status = train(make_cfg(tmp_path, tiny_llama_dir, train_file, max_steps=6), on_step=ask_abort)
    assert status["state"] == "aborted" and status["step"] == 2
    assert not (tmp_path / "adapter").exists() and latest_checkpoint(tmp_path) is None


def test_gradient_accumulation_equals_the_full_batch(tiny_llama_dir, train_file, tmp_path):
    train(make_cfg(tmp_path / "full", tiny_llama_dir, train_file, batch_size=6, max_steps=3))
    train(make_cfg(tmp_path / "accum", tiny_llama_dir, train_file, batch_size=6, max_steps=3, grad_accum_steps=3))
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)
    full, accum = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "accum")
    for key in full:
        torch.testing.assert_close(accum[key], full[key], rtol=1e-5, atol=1e-6)
    # The micro-batches were really smaller: 2 sequences of the 6.
    assert read_status(tmp_path / "accum")["memory_estimate"]["micro_batch"] == 2


def test_gradient_checkpointing_same_losses(tiny_llama_dir, train_file, tmp_path):
    train(make_cfg(tmp_path / "plain", tiny_llama_dir, train_file, max_steps=3))
    train(make_cfg(tmp_path / "gc", tiny_llama_dir, train_file, max_steps=3, gradient_checkpointing=True))
    assert losses(tmp_path / "gc") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)


def test_bf16_gradient_accumulation_and_checkpointing_stay_close_to_the_full_batch(tiny_llama_dir, train_file, tmp_path):
    """bf16 autocast (forced: it runs on any CPU) rounds differently per micro-batch and per
    recompute, so these hold within bf16's precision rather than exactly."""
    kw = dict(batch_size=6, max_steps=3, precision="bf16")
    train(make_cfg(tmp_path / "full", tiny_llama_dir, train_file, **kw))
    train(make_cfg(tmp_path / "accum", tiny_llama_dir, train_file, grad_accum_steps=3, **kw))
    train(make_cfg(tmp_path / "gc", tiny_llama_dir, train_file, gradient_checkpointing=True, **kw))
    assert read_status(tmp_path / "full")["precision"] == "bfloat16"
    full = losses(tmp_path / "full")
    assert losses(tmp_path / "accum") == pytest.approx(full, rel=2e-2)
    assert losses(tmp_path / "gc") == pytest.approx(full, rel=2e-2)
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "accum")
    for key in a:
        assert a[key].dtype == torch.float32  # master weights stay fp32 under autocast
        torch.testing.assert_close(b[key], a[key], rtol=5e-2, atol=2e-3)


def test_bf16_stop_then_resume_gives_the_same_losses_as_one_run(tiny_llama_dir, train_file, tmp_path):
    """Resume restores everything a bf16 step depends on: still bit for bit."""
    kw = dict(max_steps=6, dropout=0.1, precision="bf16")
    train(make_cfg(tmp_path / "a", tiny_llama_dir, train_file, **kw))
    train(make_cfg(tmp_path / "b", tiny_llama_dir, train_file, **kw), should_stop=stop_after(tmp_path / "b", 3))
    second = train(TrainConfig.load(tmp_path / "b" / "config.json"), resume=True)
    assert second["state"] == "done" and second["resumed_from"] == 3
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_gradient_checkpointing_keeps_fewer_activations(tiny_llama_dir, train_file):
    cfg = make_cfg("unused", tiny_llama_dir, train_file)

    def saved_bytes(checkpointing: bool) -> int:
        parts = prepare(make_plan(cfg, "cpu"))
        model = parts["model"]
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        return measured_saved_bytes(model, collate(parts["examples"][:4], parts["tokenizer"].pad_token_id))

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


def _seven_val_examples(monkeypatch) -> None:
    """Make every run hold out its first 7 training examples as validation data."""
    real_prepare = run_mod.prepare

    def with_validation(plan):
        parts = real_prepare(plan)
        parts["val_examples"] = parts["examples"][:7]
        return parts

    monkeypatch.setattr(run_mod, "prepare", with_validation)


def _fp32_eval_oracle(run_dir, model_dir) -> float:
    """The run's saved adapter on a fresh fp32 model, its 7 validation examples, one mean loss."""
    from lora_studio.adapters import load_adapter
    from lora_studio.models import load_model

    parts = run_mod.prepare(make_plan(TrainConfig.load(run_dir / "config.json"), "cpu"))  # patched: 7 val examples
    model = load_model(model_dir)
    load_adapter(model, run_dir / "adapter")
    total = count = 0
    with torch.no_grad():
        for e in parts["val_examples"]:
            loss, n = causal_lm_loss(model, collate([e], parts["tokenizer"].pad_token_id))
            total, count = total + float(loss), count + n
    return total / count


def test_eval_loss_at_the_interval_equals_a_direct_computation(tiny_llama_dir, train_file, tmp_path, monkeypatch):
    _seven_val_examples(monkeypatch)
    status = train(make_cfg(tmp_path, tiny_llama_dir, train_file, max_steps=5, eval_every=2))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 5]  # the interval, and the last step
    assert status["eval_loss"] == rows[-1]["eval_loss"] and status["n_val_examples"] == 7
    assert rows[-1]["eval_loss"] == pytest.approx(_fp32_eval_oracle(tmp_path, tiny_llama_dir), rel=1e-5)


def test_bf16_eval_loss_is_close_to_the_fp32_computation(tiny_llama_dir, train_file, tmp_path, monkeypatch):
    _seven_val_examples(monkeypatch)
    train(make_cfg(tmp_path, tiny_llama_dir, train_file, max_steps=3, precision="bf16"))
    eval_loss, oracle = read_metrics(tmp_path)[-1]["eval_loss"], _fp32_eval_oracle(tmp_path, tiny_llama_dir)
    assert eval_loss == pytest.approx(oracle, rel=2e-2)
    assert eval_loss != pytest.approx(oracle, rel=1e-7)  # it really ran in bf16


def test_metrics_rows_have_the_live_numbers(tiny_llama_dir, train_file, tmp_path):
    train(make_cfg(tmp_path, tiny_llama_dir, train_file, max_steps=3))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("loss", "lr", "lrs", "grad_norm", "tokens_per_s", "elapsed_s", "eta_s", "progress", "rss_mb", "peak_rss_mb"):
            assert key in r, key
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["rss_mb"] > 0
    assert rows[-1]["progress"] == 1.0 and rows[-1]["eta_s"] == 0.0
    assert rows[0]["elapsed_s"] < rows[-1]["elapsed_s"]
    assert read_metrics(tmp_path, since=2) == rows[2:]


def test_out_of_memory_fails_with_advice(tiny_llama_dir, train_file, tmp_path, monkeypatch):
    def oom(self, ids):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "step", oom)
    status = train(make_cfg(tmp_path, tiny_llama_dir, train_file, max_steps=2))
    assert status["state"] == "failed"
    for advice in ("batch size", "max sequence length", "gradient checkpointing", "4-bit"):
        assert advice in status["error"]
    assert "OutOfMemoryError" in (tmp_path / "error.log").read_text()


def test_bad_data_fails_with_the_validation_message(tiny_llama_dir, tmp_path):
    rows = format_rows(3)
    del rows[1]["output"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    status = train(make_cfg(tmp_path / "run", tiny_llama_dir, bad))
    assert status["state"] == "failed"
    assert "bad.jsonl" in status["error"] and "row 2" in status["error"] and "output" in status["error"]


def test_fp16_on_cpu_is_refused_with_a_reason(tiny_llama_dir, train_file, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 is allowed")
    status = train(make_cfg(tmp_path, tiny_llama_dir, train_file, precision="fp16", max_steps=1))
    assert status["state"] == "failed" and "needs a GPU" in status["error"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_gpu_trains_and_reports_cuda_memory(tiny_llama_dir, train_file, tmp_path, precision):
    status = train(make_cfg(tmp_path, tiny_llama_dir, train_file, max_steps=4, precision=precision, checkpoint_every=2))
    assert status["state"] == "done", status.get("error")
    assert status["precision"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    rows = read_metrics(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["cuda_peak_mb"] > 0 and r["cuda_reserved_mb"] >= r["cuda_allocated_mb"] for r in rows)
