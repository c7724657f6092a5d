"""What the trainer does at each evaluation besides the eval loss: probe prompts answered
greedily (RUN/probes.jsonl) and early stopping (on the eval loss, or on the ROUGE-L of greedy
replies to a test file), keeping the best evaluation's adapter weights.

Standalone so the training loop only needs a small hook (see `EvalWatch`):

    watch = EvalWatch(cfg, run_dir, model, tokenizer, method, autocast)   # rank 0 only (Trainer.__init__)
    ...after an evaluation:  stop = watch.after_eval(step, row)          # row holds eval_loss if any
    ...before saving the adapter:  watch.restore_best()
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lora_studio.compare import GenerationSettings

PROBES_FILE = "probes.jsonl"


def answer_probes(
    model: nn.Module, tokenizer: Any, prompts: list[str], settings: GenerationSettings | None = None,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy replies to `prompts` with the model as it is now (eval mode while generating,
    then back to the mode it was in: this runs in the middle of training)."""
    from lora_studio.evaluate import generate_replies

    settings = settings or GenerationSettings(max_new_tokens=48)
    was_training = model.training
    model.eval()
    try:
        return generate_replies(model, tokenizer, prompts, settings, system_prompt=system_prompt)
    finally:
        model.train(was_training)


def read_probes(run_dir: str | Path) -> list[dict[str, Any]]:
    """RUN/probes.jsonl rows ({"step", "prompt", "reply"}), oldest first; a torn last line is skipped."""
    path = Path(run_dir) / PROBES_FILE
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


class EarlyStopper:
    """Stops after `patience` evaluations in a row without a better value than the best so far.
    mode `min` (a loss) or `max` (a score); an improvement must beat the best by `min_delta`."""

    def __init__(self, patience: int, mode: str = "min", min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1 (got {patience})")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max (got {mode!r})")
        self.patience, self.mode, self.min_delta = patience, mode, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def improved(self, value: float) -> bool:
        if self.best is None:
            return math.isfinite(value)
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation; True when training should stop now."""
        if self.improved(value):
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience


class EvalWatch:
    """Probes and early stopping for one run (rank 0). `method` and `autocast` come from the
    loop: the best weights are kept with the same tensors a checkpoint keeps."""

    def __init__(
        self, cfg: Any, run_dir: Path, model: nn.Module, tokenizer: Any, method: Any,
        autocast: Callable[[], contextlib.AbstractContextManager], from_step: int = 0,
    ) -> None:  # fmt: skip
        from lora_studio.evaluate import reference_rows
        from lora_studio.runfiles import write_bytes_atomic

        kept = [r for r in read_probes(run_dir) if r.get("step", 0) <= from_step]  # a resume redoes later steps
        if kept or (run_dir / PROBES_FILE).exists():
            write_bytes_atomic(run_dir / PROBES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode())

        self.cfg, self.run_dir, self.model, self.tokenizer, self.method, self.autocast = cfg, run_dir, model, tokenizer, method, autocast
        self.settings = GenerationSettings(max_new_tokens=cfg.probe_max_new_tokens)
        self.test_rows = reference_rows(cfg.test_data, cfg.format, cfg.columns) if cfg.early_stop and cfg.test_data else []
        self.metric = "rougeL" if self.test_rows else "eval_loss"
        self.stopper = EarlyStopper(cfg.early_stop, "max" if self.test_rows else "min") if cfg.early_stop else None
        self.best_tensors: dict[str, torch.Tensor] | None = None

    def after_eval(self, step: int, row: dict[str, Any]) -> bool:
        """Answer the probes, then (early stopping on) score and compare; True: stop now.
        The watched value is put in `row` (what metrics.jsonl gets) as `test_rougeL` when generated."""
        if self.cfg.probes:
            with self.autocast():
                replies = answer_probes(self.model, self.tokenizer, self.cfg.probes, self.settings, self.cfg.system_prompt)
            with (self.run_dir / PROBES_FILE).open("a", encoding="utf-8") as fh:
                for prompt, reply in zip(self.cfg.probes, replies):
                    fh.write(json.dumps({"step": step, "prompt": prompt, "reply": reply}, ensure_ascii=False) + "\n")
        if self.stopper is None:
            return False
        if self.test_rows:
            from lora_studio.scoring import mean_scores, score

            with self.autocast():
                replies = answer_probes(self.model, self.tokenizer, [r["prompt"] for r in self.test_rows], self.settings, self.cfg.system_prompt)
            row["test_rougeL"] = mean_scores(score(a, r["reference"]) for a, r in zip(replies, self.test_rows))["rougeL"]
            value = row["test_rougeL"]
        elif "eval_loss" in row:
            value = row["eval_loss"]
        else:
            return False
        stop = self.stopper.update(value, step)
        if self.stopper.best_step == step:  # a copy of this evaluation's adapter, restored at the end
            from lora_studio.engine.checkpoint import checkpoint_tensors

            self.best_tensors = {k: v.detach().to("cpu", copy=True) for k, v in checkpoint_tensors(self.model, self.method).items()}
        return stop

    def restore_best(self) -> int | None:
        """Put the best evaluation's weights back into the model; returns that step (None: no early stopping)."""
        if self.stopper is None or self.best_tensors is None:
            return None
        from lora_studio.engine.checkpoint import restore_model_tensors

        device = next(self.model.parameters()).device
        restore_model_tensors(self.model, {k: v.to(device) for k, v in self.best_tensors.items()}, self.method)
        return self.stopper.best_step

    def stop_reason(self, step: int) -> str:
        s = self.stopper
        assert s is not None and s.best is not None
        return (f"early stop at step {step}: {self.metric} did not improve for {s.patience} evaluation(s); "
                f"the adapter is from step {s.best_step} ({self.metric} {s.best:.4f})")  # fmt: skip
