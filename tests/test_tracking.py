"""Experiment tracking: off by default with nothing imported; with --report-to, every metrics.jsonl
row (what the charts show) reaches the tracker at its step; a missing tracker is named with its pip
package; a token never travels in the logged config."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from lora_studio.config import TrainConfig
from lora_studio.tracking import metric_values
from lora_studio.engine.run import train
from tests.conftest import format_rows, write_jsonl

TRACKER_MODULES = ("wandb", "trackio", "tensorboard", "torch.utils.tensorboard")
SECRET = "hf_SECRETabcdefghijklmnop123"


def config(tmp_path: Path, model: str, **kw) -> TrainConfig:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows(8))
    return TrainConfig(data=str(data), out=str(tmp_path / "run"), model=model, rank=2, batch_size=4, max_steps=3,
                       val_fraction=0.25, eval_every=2, **kw)  # fmt: skip


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


class ImportSpy:
    """A meta path finder that records (and, for names in `block`, refuses) tracker imports."""

    def __init__(self, block: tuple[str, ...] = ()) -> None:
        self.seen: list[str] = []
        self.block = block

    def find_spec(self, name, path=None, target=None):
        if name in TRACKER_MODULES:
            self.seen.append(name)
            if name in self.block:
                raise ModuleNotFoundError(f"No module named {name!r}")
        return None


@pytest.fixture
def spy(monkeypatch):
    def install(block: tuple[str, ...] = ()) -> ImportSpy:
        finder = ImportSpy(block)
        for name in TRACKER_MODULES:
            monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
        return finder

    return install


def fake_tracker(kind: str) -> tuple[types.ModuleType, dict]:
    """A stand-in for wandb or trackio recording init's arguments, each log call and finish."""
    calls: dict = {"init": None, "log": [], "finish": 0}
    module = types.ModuleType(kind)

    def init(**kwargs):
        calls["init"] = kwargs
        return run

    def log(values, step=None):
        calls["log"].append((step, dict(values)))

    def finish():
        calls["finish"] += 1

    run = types.SimpleNamespace(log=log, finish=finish)
    module.init, module.log, module.finish = init, log, finish
    return module, calls


def test_off_by_default_and_nothing_is_imported(spy, tiny_llama_dir, tmp_path):
    finder = spy()
    cfg = config(tmp_path, tiny_llama_dir)
    assert cfg.report_to is None
    assert train(cfg)["state"] == "done"
    assert finder.seen == []
    assert not (tmp_path / "run" / "tensorboard").exists()
    # and importing the engine pulls in none of them either
    import subprocess

    code = f"import sys, lora_studio.engine.run, lora_studio.cli; print([m for m in {TRACKER_MODULES!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", ["wandb", "trackio"])
def test_every_metrics_row_reaches_the_tracker_without_the_token(kind, tiny_llama_dir, tmp_path, monkeypatch):
    module, calls = fake_tracker(kind)
    monkeypatch.setitem(sys.modules, kind, module)
    cfg = config(tmp_path, tiny_llama_dir, report_to=kind, system_prompt=f"never say {SECRET}")
    assert train(cfg)["state"] == "done"
    rows = metrics_rows(tmp_path / "run")
    assert len(rows) >= 2 and any("eval_loss" in r for r in rows)
    assert calls["log"] == [(r["step"], metric_values(r)) for r in rows]
    assert {"loss", "lr", "eval_loss", "tokens_per_s"} <= set().union(*(v for _, v in calls["log"]))
    assert calls["finish"] == 1
    init = calls["init"]
    assert init["project"] == "lora-studio" and init["name"] == "run"
    assert init["config"]["method"] == "lora" and init["config"]["report_to"] == kind
    assert SECRET not in json.dumps(init) and "hf_***" in init["config"]["system_prompt"]


def test_a_missing_tracker_fails_the_run_naming_its_pip_package(spy, tiny_llama_dir, tmp_path):
    finder = spy(block=("wandb",))
    status = train(config(tmp_path, tiny_llama_dir, report_to="wandb"))
    assert finder.seen == ["wandb"]
    assert status["state"] == "failed" and "pip install wandb" in status["error"]
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_tracker_failing_mid_run_is_reported_and_the_run_goes_on(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    module, calls = fake_tracker("trackio")

    def broken(values, step=None):
        raise ConnectionError(f"server gone (token {SECRET})")

    module.log = broken
    monkeypatch.setitem(sys.modules, "trackio", module)
    assert train(config(tmp_path, tiny_llama_dir, report_to="trackio"))["state"] == "done"
    err = capsys.readouterr().err
    assert err.count("trackio stopped receiving metrics") == 1 and SECRET not in err
    assert len(metrics_rows(tmp_path / "run")) >= 2


def test_unknown_tracker_is_refused():
    with pytest.raises(ValueError, match="report_to must be one of trackio, tensorboard, wandb"):
        TrainConfig(data="d.jsonl", out="o", report_to="mlflow").validate()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_cli_report_to_tensorboard_writes_the_loss_scalars(tiny_llama_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_studio.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", format_rows(8))
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), "--model", tiny_llama_dir, "--rank", "2",
            "--batch-size", "4", "--max-steps", "3", "--val-fraction", "0.25", "--eval-every", "2", "--report-to", "tensorboard"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((run / "config.json").read_text())["report_to"] == "tensorboard"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    rows = metrics_rows(run)
    for key in ("loss", "eval_loss", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in logged] == [s for s, _ in want] and want
        assert [v for _, v in logged] == pytest.approx([v for _, v in want], rel=1e-6)
