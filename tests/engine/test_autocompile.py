"""`compile: auto`: the decision from timed eager steps and the recorded compile time, the record
kept for the next run, and the loop's use of it (with a stand-in for the compiler: compiling
for real is tested in test_speed.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lora_studio.engine.loop as loop_mod
from lora_studio.engine import autocompile
from lora_studio.engine.autocompile import EAGER_STEPS, MEASURED_STEPS, AutoCompile
from lora_studio.runfiles import read_metrics, read_status
from lora_studio.engine.run import train
from tests.engine.test_loop import make_cfg


class _Cfg:
    def __init__(self, compile="auto", model="m", method="lora", precision="bf16"):
        self.compile, self.model, self.method, self.precision = compile, model, method, precision


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(autocompile, "compiler_available", lambda device: True)


def _auto(cfg=None, world=1, compile_s=20.0):
    calls = []
    auto = AutoCompile(cfg or _Cfg(), nn.Linear(2, 2), torch.device("cpu"), world, calls.append, lambda: compile_s)
    return auto, calls


def test_it_compiles_only_where_the_steps_left_win_back_the_compile_time():
    # Eager steps 1.0 s (the first, 5 s, is left out); default gain 15 %, default cold compile 120 s on a CPU.
    long, calls = _auto()
    notes = [long.after_step(s, 2000) for s in [5.0] + [1.0] * (EAGER_STEPS - 1)]
    assert notes[:-1] == [None] * (EAGER_STEPS - 1)
    assert calls and long.active and notes[-1].startswith("auto: compiling")
    assert "2000 steps left × 1.00 s × 15% gain ≈ 300 s against ~120 s to compile" in notes[-1]
    short, calls = _auto()
    notes = [short.after_step(1.0, 1000) for _ in range(EAGER_STEPS)]  # 150 s won: not 1.5 × 120
    assert not calls and not short.active and notes[-1].startswith("auto: eager")
    assert short.after_step(1.0, 999) is None  # decided once


def test_the_measured_compile_time_and_gain_are_kept_for_the_next_run():
    first, _ = _auto(compile_s=33.3)
    for _ in range(EAGER_STEPS):
        first.after_step(1.0, 5000)
    assert first.active and first.untried
    for s in [40.0] + [0.7] * MEASURED_STEPS:  # the step that compiles, then compiled steps
        first.after_step(s, 4000)
    assert not first.untried
    record = json.loads(autocompile.records_path().read_text())
    assert record[first.key] == {"compile_s": 33.3, "gain": 0.3}
    assert autocompile.predicted(first.key, torch.device("cpu")) == (33.3, 0.3)
    # The next run on the same model predicts from that record: 400 steps × 1 s × 30 % = 120 s > 1.5 × 33.3.
    second, calls = _auto()
    for _ in range(EAGER_STEPS):
        second.after_step(1.0, 400)
    assert calls
    other, calls = _auto(_Cfg(model="another"))  # another model: the defaults again
    for _ in range(EAGER_STEPS):
        other.after_step(1.0, 400)
    assert not calls


@pytest.mark.parametrize("setting, world", [(False, 1), (True, 1), ("auto", 2)])
def test_auto_decides_only_for_compile_auto_on_one_process(setting, world):
    auto, calls = _auto(_Cfg(compile=setting), world=world)
    assert [auto.after_step(1.0, 10**6) for _ in range(EAGER_STEPS)] == [None] * EAGER_STEPS
    assert not calls and auto.state == "off"


def test_without_a_compiler_auto_stays_off(monkeypatch):
    monkeypatch.undo()
    monkeypatch.setattr(autocompile.shutil, "which", lambda name: None)
    assert autocompile.compiler_available(torch.device("cpu")) is False
    assert AutoCompile(_Cfg(), nn.Linear(2, 2), torch.device("cpu"), 1, print, lambda: 0.0).state == "off"


def _compile_at_once(monkeypatch):
    monkeypatch.setattr(autocompile, "predicted", lambda key, device: (0.0, 0.5))


def test_the_loop_compiles_after_the_timed_steps_and_says_so(tiny_llama_dir, train_file, tmp_path, monkeypatch):
    _compile_at_once(monkeypatch)
    compiled = []
    monkeypatch.setattr(loop_mod, "compile_regions", lambda model: compiled.append(model))
    status = train(make_cfg(tmp_path / "r", tiny_llama_dir, train_file, compile="auto", epochs=2))
    assert status["state"] == "done" and len(compiled) == 1
    rows = read_metrics(tmp_path / "r")
    decided = [r for r in rows if "compile" in r]
    assert [r["step"] for r in decided] == [EAGER_STEPS] and decided[0]["compile"].startswith("auto: compiling")
    assert all("compile_s" in r for r in rows[EAGER_STEPS:]) and not any("compile_s" in r for r in rows[:EAGER_STEPS])
    assert read_status(tmp_path / "r")["compile"].startswith("auto: compiling")


def test_a_compile_that_fails_goes_back_to_eager_and_loses_nothing(tiny_llama_dir, train_file, tmp_path, monkeypatch):
    """The step that compiles raises (no working compiler, say): the loop undoes the compile,
    reruns that step eagerly, and trains the same losses as a run that never compiled."""
    _compile_at_once(monkeypatch)

    def broken_compile(model):
        def fail_once(module, args):
            handle.remove()
            raise RuntimeError("no C++ compiler")

        handle = model.get_input_embeddings().register_forward_pre_hook(fail_once)

    monkeypatch.setattr(loop_mod, "compile_regions", broken_compile)
    status = train(make_cfg(tmp_path / "r", tiny_llama_dir, train_file, compile="auto", epochs=2))
    assert status["state"] == "done"
    note = read_status(tmp_path / "r")["compile"]
    assert note.startswith("auto: compiling failed (RuntimeError: no C++ compiler)")
    plain = train(make_cfg(tmp_path / "p", tiny_llama_dir, train_file, compile=False, epochs=2))
    assert plain["state"] == "done"
    assert [r["loss"] for r in read_metrics(tmp_path / "r")] == [r["loss"] for r in read_metrics(tmp_path / "p")]


def test_compile_setting_is_checked():
    from lora_studio.config import TrainConfig

    with pytest.raises(ValueError, match="compile must be true, false or auto"):
        TrainConfig(data="x", out="y", compile="sometimes").resolved()
    assert TrainConfig(data="x", out="y").compile == "auto"
