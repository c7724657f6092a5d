"""`compile: auto`: train the first steps eagerly, then compile the decoder layers (regional,
`speed.compile_regions`) only where the steps left are predicted to win back the compile time.

Compiling pays on long runs only: on the bundled model (bf16, 2 CPU cores) a compiled step
takes ~0.85× an eager one, and compiling costs ~17 s with a warm on-disk cache and a minute or
more cold (docs/bench.md), so the bench's 28-step epoch loses and a 1,000-step run wins. The
prediction: win = steps left × median eager step × gain, against the compile time, where gain
and compile time are the last ones measured for this model, method, precision and device
(kept beside inductor's cache, `compile_times.json`), else the defaults below. The decision and
the seconds it spent show in the run's status (`compile`, `compile_s`).
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

EAGER_STEPS = 4
"""Eager steps timed before deciding; the first (kernel creation, the packing probe) is left out."""
DEFAULT_GAIN = 0.15
"""1 − compiled step / eager step, measured on the bundled model in bf16 on 2 Zen 4 cores."""
COLD_COMPILE_S = {"cpu": 120.0, "cuda": 60.0}
"""Compile seconds assumed before one was measured here (cold cache, few cores: ~66 s to 6 min)."""
MARGIN = 1.5
"""The predicted win must beat the compile time by this factor: the prediction is rough."""
MEASURED_STEPS = 3
"""Compiled steps timed (after the one that compiles) for the gain that is recorded."""


def compiler_available(device: torch.device) -> bool:
    """Inductor needs a C++ compiler on a CPU and Triton on a GPU."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def records_path() -> Path:
    from lora_studio.models import cache_dir

    return cache_dir() / "inductor" / "compile_times.json"


def record_key(cfg: Any, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Model, method, the products' dtype (autocast's, or fp32), device kind and torch version."""
    products = str(dtype or torch.float32).removeprefix("torch.")
    return f"{cfg.model}|{cfg.method}|{products}|{device.type}|torch {torch.__version__}"


def _records() -> dict[str, Any]:
    try:
        return json.loads(records_path().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: start over
        return {}


def predicted(key: str, device: torch.device) -> tuple[float, float]:
    """(compile seconds, gain) last measured under `key`, else the defaults."""
    record = _records().get(key) or {}
    compile_s = float(record.get("compile_s", COLD_COMPILE_S.get(device.type, 120.0)))
    gain = float(record.get("gain", DEFAULT_GAIN))
    return compile_s, gain


def remember(key: str, compile_s: float, gain: float) -> None:
    from lora_studio.runfiles import write_json_atomic

    path, records = records_path(), _records()
    records[key] = {"compile_s": round(compile_s, 1), "gain": round(min(max(gain, 0.0), 0.9), 3)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, records)


class AutoCompile:
    """The decision for one run, fed each step's seconds by the loop (`after_step`)."""

    def __init__(self, cfg: Any, model: nn.Module, device: torch.device, world: int,
                 compile_layers: Callable[[nn.Module], Any], compile_seconds: Callable[[], float],
                 dtype: torch.dtype | None = None) -> None:
        enabled = cfg.compile == "auto" and world == 1 and compiler_available(device)
        self.model, self.device, self.key = model, device, record_key(cfg, device, dtype)
        self.compile_layers, self.compile_seconds = compile_layers, compile_seconds
        self.eager: list[float] = []
        self.compiled: list[float] = []
        self.state = "measuring" if enabled else "off"  # -> "compiled" or "eager"
        self.eager_step = 0.0

    @property
    def active(self) -> bool:
        return self.state == "compiled"

    @property
    def untried(self) -> bool:
        """Compiled, and the step that compiles has not run yet."""
        return self.state == "compiled" and not self.compiled

    def after_step(self, step_s: float, steps_left: int) -> str | None:
        """Returns a sentence for the status when it decides, else None."""
        if self.state == "compiled":
            self._measure_compiled(step_s)
            return None
        if self.state != "measuring":
            return None
        self.eager.append(step_s)
        if len(self.eager) < EAGER_STEPS:
            return None
        self.eager_step = statistics.median(self.eager[1:])
        compile_s, gain = predicted(self.key, self.device)
        win = steps_left * self.eager_step * gain
        numbers = (f"{steps_left} steps left × {self.eager_step:.2f} s × {gain:.0%} gain ≈ {win:.0f} s "
                   f"against ~{compile_s:.0f} s to compile")
        if win > MARGIN * compile_s:
            self.compile_layers(self.model)
            self.state = "compiled"
            return f"auto: compiling the decoder layers ({numbers})"
        self.state = "eager"
        return f"auto: eager ({numbers})"

    def _measure_compiled(self, step_s: float) -> None:
        self.compiled.append(step_s)
        if len(self.compiled) == 1 + MEASURED_STEPS:  # the first compiled step is the one that compiles
            gain = 1.0 - statistics.median(self.compiled[1:]) / self.eager_step
            try:
                remember(self.key, self.compile_seconds(), gain)
            except OSError:  # a read-only cache: the next run predicts from the defaults again
                pass

    def fall_back(self, error: Exception) -> str:
        """The first compiled step failed (no working compiler, an unsupported op): back to eager."""
        from lora_studio.engine.speed import uncompile_regions

        uncompile_regions(self.model)
        self.state = "eager"
        return f"auto: compiling failed ({error.__class__.__name__}: {str(error)[:200]}); eager"
