"""Faults while checkpointing: the disk fills up or turns read-only in the middle of writing a
checkpoint. The last good checkpoint stays readable, the run is failed with a message that
says what happened, no half-written copy is left, and a resume gives the same losses as a run
that never failed. (kill -9 of the worker: tests/test_runner.py.)"""

from __future__ import annotations

import errno
import os

import pytest
import torch

import lora_studio.engine.checkpoint as ckpt
from lora_studio.engine.checkpoint import latest_checkpoint, load_checkpoint
from lora_studio.config import TrainConfig
from lora_studio.runfiles import read_metrics, read_status
from lora_studio.engine.run import train

FAULTS = {
    "disk_full": (errno.ENOSPC, "disk full"),
    "read_only": (errno.EROFS, "read-only disk"),
}


def cfg(out, model_dir, data, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model=model_dir, rank=4, batch_size=5, epochs=3, max_steps=6,
                checkpoint_every=2, eval_every=0, dropout=0.1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("target", ["model", "optimizer"])
def test_fault_while_checkpointing_keeps_the_last_good_one_and_resumes(
    tiny_llama_dir, train_file, tmp_path, monkeypatch, fault, target
):
    code, words = FAULTS[fault]
    reference = train(cfg(tmp_path / "ref", tiny_llama_dir, train_file))
    assert reference["state"] == "done"

    calls = {"n": 0}
    real_save_file, real_torch_save = ckpt.save_file, ckpt.torch.save

    def fail_second(path) -> None:
        # The second checkpoint (step 4): half the bytes land, then the write fails.
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as fh:
                fh.write(b"\x00" * 100)
            raise OSError(code, os.strerror(code), str(path))

    def save_file(tensors, path, metadata=None):
        if str(path).endswith("model.safetensors") and target == "model":
            fail_second(path)
        return real_save_file(tensors, path, metadata=metadata)

    def torch_save(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt") and target == "optimizer":
            fail_second(path)
        return real_torch_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    monkeypatch.setattr(ckpt.torch, "save", torch_save)
    run = tmp_path / "run"
    failed = train(cfg(run, tiny_llama_dir, train_file))
    assert failed["state"] == "failed"
    assert words in failed["error"] and "resume" in failed["error"]
    assert read_status(run)["state"] == "failed"  # written, not only returned

    good = latest_checkpoint(run)
    assert good is not None and good.name == "step-000002"
    loaded = load_checkpoint(good, 0, torch.device("cpu"))  # readable, complete
    assert loaded["state"]["step"] == 2 and loaded["model"]
    assert not list((run / "checkpoints").glob("*.tmp"))  # the half-written copy is gone

    monkeypatch.undo()  # space freed
    resumed = train(TrainConfig.load(run / "config.json"), resume=True)
    assert resumed["state"] == "done" and resumed["resumed_from"] == 2
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(tmp_path / "ref")]


def test_a_failed_status_write_never_leaves_a_broken_status(tmp_path, monkeypatch):
    """status.json is replaced atomically: a write that fails midway keeps the old one whole."""
    from lora_studio import runfiles as rf

    rf.write_status(tmp_path, rf.RUNNING, step=3)

    def full(fd):  # the new text is in the temp file; the disk fills as it reaches the device
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rf.os, "fsync", full)
    with pytest.raises(OSError):
        rf.write_status(tmp_path, rf.RUNNING, step=4)
    monkeypatch.undo()
    assert rf.read_status(tmp_path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [rf.STATUS]  # no temp file left


def test_out_of_memory_mid_run_keeps_the_last_checkpoint_and_resumes(tiny_llama_dir, train_file, tmp_path, monkeypatch):
    """An OOM at step 5 (checkpoints at 2 and 4): failed with advice, step 4 readable, resume equal."""
    from lora_studio.engine.loop import Trainer

    reference = train(cfg(tmp_path / "ref", tiny_llama_dir, train_file))
    assert reference["state"] == "done"
    real_step = Trainer.step

    def step(self, ids):
        if self.pos.step == 4:  # the fifth optimizer step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_step(self, ids)

    monkeypatch.setattr(Trainer, "step", step)
    run = tmp_path / "run"
    failed = train(cfg(run, tiny_llama_dir, train_file))
    assert failed["state"] == "failed" and read_status(run)["state"] == "failed"
    assert "batch size" in failed["error"]  # the advice, not a bare traceback
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    good = latest_checkpoint(run)
    assert good is not None and good.name == "step-000004"
    assert load_checkpoint(good, 0, torch.device("cpu"))["state"]["step"] == 4

    monkeypatch.undo()  # a smaller batch elsewhere, or the memory freed: resume
    resumed = train(TrainConfig.load(run / "config.json"), resume=True)
    assert resumed["state"] == "done" and resumed["resumed_from"] == 4
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(tmp_path / "ref")]


# ---------------------------------------------------------------- a diverging run


def _poisoned_model_dir(model_dir: str, out) -> str:
    """The tiny model with a single NaN in one frozen weight (the first MLP's gate)."""
    from lora_studio.models import load_model, load_tokenizer

    model = load_model(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[0, 0] = float("nan")
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return str(out)


def _all_finite(path) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_nan_in_a_frozen_weight_fails_at_step_one_and_writes_no_weights(tiny_llama_dir, train_file, tmp_path, precision):
    model_dir = _poisoned_model_dir(tiny_llama_dir, tmp_path / "poisoned")
    run = tmp_path / "run"
    status = train(cfg(run, model_dir, train_file, precision=precision, checkpoint_every=1, dropout=0.0))
    assert status["state"] == "failed" and read_status(run)["state"] == "failed"
    assert "loss became NaN at step 1" in status["error"]
    assert "learning rate" in status["error"]  # what to try
    assert not (run / "adapter").exists() and latest_checkpoint(run) is None
    assert read_metrics(run) == []  # the step was not applied, so not logged either


def test_a_loss_turning_nan_mid_run_keeps_the_last_good_checkpoint(tiny_llama_dir, train_file, tmp_path, monkeypatch):
    """Steps 1-3 are fine (checkpoint at 2); the model turns NaN after step 3: step 4 stops the run
    before the optimizer applies it; checkpoint 2 stays, finite, and nothing non-finite is written."""
    from lora_studio.engine.loop import Trainer

    real_step = Trainer.step

    def step(self, ids):
        if self.pos.step == 3:  # before the fourth step: a NaN appears in a frozen weight
            with torch.no_grad():
                self.model.model.layers[1].self_attn.o_proj.base.weight[0, 0] = float("nan")
        return real_step(self, ids)

    run = tmp_path / "run"
    monkeypatch.setattr(Trainer, "step", step)
    status = train(cfg(run, tiny_llama_dir, train_file, precision="fp32"))
    assert status["state"] == "failed" and "loss became NaN at step 4" in status["error"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    good = latest_checkpoint(run)
    assert good is not None and good.name == "step-000002"
    assert _all_finite(good / "model.safetensors")
    assert not (run / "adapter").exists()


def test_no_file_with_non_finite_weights_is_ever_written(tmp_path):
    from lora_studio.adapters import require_finite

    with pytest.raises(ValueError, match="NaN or inf .*first: b"):
        require_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, "the test file")
    require_finite({"a": torch.ones(2), "steps": torch.tensor([3])}, "the test file")  # finite: no error
    with pytest.raises(ValueError, match="not writing the checkpoint of step 5"):
        ckpt.save_checkpoint(tmp_path, 5, {"w": torch.tensor([float("nan")])}, {}, {})
    assert latest_checkpoint(tmp_path) is None and not list((tmp_path / "checkpoints").glob("*"))


# ---------------------------------------------------------------- a corrupt checkpoint


def test_the_two_newest_checkpoints_are_kept_and_a_corrupt_newest_falls_back(tiny_llama_dir, train_file, tmp_path):
    reference = train(cfg(tmp_path / "ref", tiny_llama_dir, train_file))
    assert reference["state"] == "done"
    run = tmp_path / "run"
    stopped = train(cfg(run, tiny_llama_dir, train_file), should_stop=lambda: len(read_metrics(run)) >= 5)
    assert stopped["state"] == "stopped" and stopped["step"] == 5
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000004", "step-000005"]
    # The newest is cut short on disk (a crash of the storage, not of our rename).
    newest = run / "checkpoints" / "step-000005" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])

    resumed = train(TrainConfig.load(run / "config.json"), resume=True)
    assert resumed["state"] == "done" and resumed["resumed_from"] == 4
    assert "step-000005" in resumed["resume_note"] and "resumed from step-000004" in resumed["resume_note"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(tmp_path / "ref")]
