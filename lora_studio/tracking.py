"""Optional experiment tracking: the rows of RUN/metrics.jsonl (what the charts draw) sent to
trackio, TensorBoard or Weights & Biases as the run writes them.

Off unless `report_to` names a tracker. Each tracker is an optional extra, imported only when it
is asked for, so none is a dependency of the studio; a missing one is refused before training
starts, naming the pip package. The config sent along is the run's settings with anything
token-like redacted; the environment (HF_TOKEN, WANDB_API_KEY, ...) is never read here: each
tracker's own client reads its credentials itself.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from lora_studio.redact import redact

TRACKERS = ("trackio", "tensorboard", "wandb")
PIP_PACKAGE = {"trackio": "trackio", "tensorboard": "tensorboard", "wandb": "wandb"}
PROJECT = "lora-studio"


class TrackerMissing(ValueError):
    """The tracker asked for is not installed."""


def check_report_to(report_to: str | None) -> None:
    """Refuse an unknown tracker name (no import: config validation stays cheap)."""
    if report_to is not None and report_to not in TRACKERS:
        raise ValueError(f"report_to must be one of {', '.join(TRACKERS)} or None (got {report_to!r})")


def _import(name: str, tracker: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise TrackerMissing(
            f"--report-to {tracker} needs the {PIP_PACKAGE[tracker]!r} package, which is not installed: "
            f"pip install {PIP_PACKAGE[tracker]} ({e})"
        ) from None


def safe_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run's settings as sent to a tracker: token-like strings redacted, nested values too."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return redact(value)

    return clean(config)


def metric_values(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl row, without `step` (the x axis)."""
    return {
        k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Tracker:
    """One run's connection to a tracker: `log(row)` per metrics row, `finish()` at the end."""

    def __init__(self, report_to: str, run_dir: str | Path, config: dict[str, Any]) -> None:
        check_report_to(report_to)
        self.kind = report_to
        run_dir = Path(run_dir)
        config = safe_config(config)
        if report_to == "tensorboard":
            _import("tensorboard", "tensorboard")  # torch's writer needs it; say so by name
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)
        elif report_to == "wandb":
            wandb = _import("wandb", "wandb")
            self.run = wandb.init(project=PROJECT, name=run_dir.name, config=config, dir=str(run_dir))
        else:
            self.module = _import("trackio", "trackio")
            self.module.init(project=PROJECT, name=run_dir.name, config=config)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        values = metric_values(row)
        if self.kind == "tensorboard":
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()  # the UI or `tensorboard --logdir` sees each step as it lands
        elif self.kind == "wandb":
            self.run.log(values, step=step)
        else:
            self.module.log(values, step=step)

    def finish(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "wandb":
            self.run.finish()
        else:
            self.module.finish()


def open_tracker(report_to: str | None, run_dir: str | Path, config: dict[str, Any]) -> Tracker | None:
    """A Tracker, or None when `report_to` is None (nothing imported)."""
    if report_to is None:
        return None
    return Tracker(report_to, run_dir, config)


@contextlib.contextmanager
def tracked(
    report_to: str | None, run_dir: str | Path, config: dict[str, Any], main: bool, on_step: Callable | None
) -> Iterator[Callable | None]:
    """`on_step` with each metrics row also sent to the tracker (rank 0 only), the tracker finished
    on the way out. With `report_to` None: `on_step` itself, and nothing imported.

    A tracker that fails mid-run (its server unreachable) is reported once on stderr and dropped:
    the run, its metrics.jsonl and its charts go on without it.
    """
    tracker = open_tracker(report_to, run_dir, config) if main else None
    if tracker is None:
        yield on_step
        return

    def step(row: dict[str, Any]) -> None:
        nonlocal tracker
        if tracker is not None:
            try:
                tracker.log(row)
            except Exception as e:  # noqa: BLE001 - a dashboard hiccup must not end the training
                print(f"warning: {report_to} stopped receiving metrics: {redact(str(e))}", file=sys.stderr, flush=True)
                tracker = None
        if on_step is not None:
            on_step(row)

    try:
        yield step
    finally:
        if tracker is not None:
            with contextlib.suppress(Exception):
                tracker.finish()
