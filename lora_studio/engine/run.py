"""One training job into a run folder: `train(cfg)`, what the CLI, the background runner and
torchrun call. The run's lifecycle, its signals and its errors live here, and `RunStatus` is the
one writer of status.json during a run (the loop reports through it).

A run folder receives (see runfiles.py for the formats):
  config.json     the resolved TrainConfig (reload it to repeat the run)
  status.json     {"state": running|done|stopped|aborted|failed, "step", "total_steps", "error", ...}
  metrics.jsonl   one JSON object per optimizer step (eval_loss on evaluation steps)
  checkpoints/    the last resumable checkpoints (every `checkpoint_every` steps and on stop)
  adapter/        PEFT-format adapter files (+ our record of method, template, EOS)
  merged/         the merged full model, with --merge

Lifecycle: running → done | stopped | aborted | failed. The loop reads RUN/control.json before
each step (`stop`: save a checkpoint and the adapter of the current step; `abort`: leave without
saving); SIGTERM and a first Ctrl-C are a `stop`. `train(cfg, resume=True)` continues from the
last checkpoint bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lora_studio import runfiles as rf
from lora_studio.adapters import save_adapter
from lora_studio.compare import default_generation
from lora_studio.config import TrainConfig
from lora_studio.engine import dist, fsdp
from lora_studio.engine.checkpoint import CHECKPOINTS
from lora_studio.engine.loop import StepCallback, Trainer, prepare
from lora_studio.engine.memory import estimate_for_examples
from lora_studio.engine.plan import Plan, make_plan
from lora_studio.methods import count_parameters, merge_adapters
from lora_studio.models import base_model_id
from lora_studio.redact import redact
from lora_studio.tracking import tracked


class RunStatus:
    """The one writer of RUN/status.json during a run; rank 0 writes, the other ranks write nothing."""

    def __init__(self, run_dir: Path, env: dist.DistEnv) -> None:
        self.run_dir, self.env = run_dir, env

    def running(self, **fields: Any) -> None:
        if self.env.main:
            rf.write_status(self.run_dir, rf.RUNNING, **fields)

    def finish(self, state: str, **fields: Any) -> dict[str, Any]:
        """The final state (done, stopped, aborted or failed); returns the status as written."""
        if not self.env.main:
            return {}
        rf.write_status(self.run_dir, state, finished_at=time.time(), **fields)
        return rf.read_status(self.run_dir)


def train(
    cfg: TrainConfig,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run one training job into `cfg.out`; returns the final status. Never raises for a
    failed run: the error is written to status.json and returned.

    `resume=True` continues from the last checkpoint in `cfg.out` (from step 0 if there is
    none). Under torchrun every rank calls this; only rank 0 writes the run folder.
    """
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dist.DistEnv()
    status = RunStatus(run_dir, env)
    try:
        env = dist.init_distributed()
        status = RunStatus(run_dir, env)
        plan = make_plan(cfg, env.device(), env.world)
        cfg = plan.cfg
        if env.main:
            rf.make_reserve(run_dir)  # before anything fills the disk (again, on a resume)
            cfg.save(run_dir / "config.json")
        status.running(
            pid=os.getpid(), pid_started=_process_started(), host=rf.hostname(), started_at=time.time(), error=None,
            finished_at=None, world_size=env.world, strategy=plan.strategy, method=cfg.method, model=cfg.model,
        )  # fmt: skip
        with (
            _signals_request_stop() as signalled,
            # each metrics row also to the tracker asked for (rank 0; nothing imported when None)
            tracked(cfg.report_to, run_dir, cfg.to_dict(), env.main, on_step) as on_step,
        ):
            return _train(plan, run_dir, env, status, on_step, should_stop, resume, signalled)
    except BaseException as e:  # noqa: BLE001 - every failure must end in a truthful status
        with contextlib.suppress(OSError):  # the disk may be the thing that failed
            (run_dir / ("error.log" if env.main else f"error-rank{env.rank}.log")).write_text(redact(traceback.format_exc()))
        if not env.main:
            raise
        if isinstance(e, KeyboardInterrupt):
            status.finish(rf.ABORTED, error="interrupted (Ctrl-C)")
            raise
        return status.finish(rf.FAILED, error=human_error(e))
    finally:
        dist.close_distributed(env)


def _train(
    plan: Plan,
    run_dir: Path,
    env: dist.DistEnv,
    status: RunStatus,
    on_step: StepCallback | None,
    should_stop: Callable[[], bool] | None,
    resume: bool,
    signalled: dict[str, str | None],
) -> dict[str, Any]:
    parts = prepare(plan)
    if env.main:
        rf.write_json_atomic(run_dir / "data_report.json", parts["data_report"].to_dict())
    trainer = Trainer(plan, run_dir, env, parts, report=status.running)
    trainable, total = count_parameters(trainer.model)
    resumed_from = trainer.restore() if resume else None
    if env.main:
        if resumed_from is None:  # a fresh start: nothing of an earlier run in this folder carries over
            (run_dir / rf.METRICS).write_text("")
            shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
        else:
            rf.truncate_metrics(run_dir, resumed_from)
    status.running(
        step=trainer.pos.step, total_steps=trainer.total_steps, trainable_params=trainable, total_params=total,
        n_examples=len(trainer.examples), n_val_examples=len(trainer.val_examples),
        n_truncated=parts["data_report"].n_truncated, resumed_from=resumed_from, device=str(plan.device),
        precision=plan.precision, memory_estimate=_estimate(plan, trainer) if env.main else None,
    )  # fmt: skip

    def stop_requested() -> str | None:
        """`stop`, `abort` or None, decided on rank 0 and shared, so every rank leaves together."""
        code = 0
        if env.main:
            action = signalled["action"] or rf.read_control(run_dir)
            if action is None and should_stop is not None and should_stop():
                action = "stop"
            code = {"stop": 1, "abort": 2}.get(action or "", 0)
        return {1: "stop", 2: "abort"}.get(dist.from_main(code, env, plan.device))

    final = trainer.fit(stop_requested, on_step)
    step = trainer.pos.step
    if final == rf.ABORTED:
        return status.finish(rf.ABORTED, step=step, error=None)
    fields: dict[str, Any] = {"step": step}
    # With early stopping the adapter saved is the best evaluation's; the status says why it stopped.
    best_step = trainer.restore_best() if final == rf.DONE else None
    if best_step is not None:
        watch = trainer.watch
        fields.update(best_step=best_step, best_value=watch.stopper.best, watched=watch.metric)
        if trainer.early_stop_step is not None:
            fields["stop_reason"] = watch.stop_reason(trainer.early_stop_step)
    if step > 0:
        # [FSDP hook 8] every rank gathers the adapter whole; rank 0 writes it as one process would
        with fsdp.gathered_trainable(trainer.model) if plan.sharded else contextlib.nullcontext():
            if env.main:
                save_outputs(trainer, best_step or step)
        fields["adapter"] = str(run_dir / "adapter")
    # Ranks leave together, once rank 0 has written the adapter: a rank that tore its process group
    # down while rank 0 was still writing ended in a SIGABRT at exit (seen once under FSDP on CPU).
    dist.barrier(env)
    return status.finish(final, **fields)


def _estimate(plan: Plan, trainer: Trainer) -> dict[str, Any] | None:
    """The memory estimate for this run's largest batch; never fails the run."""
    try:
        model = None if plan.sharded else trainer.model  # sharded weights: counted on a meta copy
        return estimate_for_examples(plan, model, trainer.examples).to_dict()
    except Exception as e:  # noqa: BLE001 - an estimate is advice, not a requirement
        return {"error": f"no estimate: {e}"}


def save_outputs(trainer: Trainer, step: int) -> None:
    """The adapter of `step` (PEFT files + our record) and, with `merge`, the merged model."""
    cfg, tokenizer = trainer.cfg, trainer.tokenizer
    save_adapter(
        trainer.model,
        trainer.run_dir / "adapter",
        cfg.to_dict(),
        base_model_id(cfg.model),
        extra={
            "base_model": cfg.model,
            "chat_template": tokenizer.chat_template,
            "eos_token": tokenizer.eos_token,
            "system_prompt": cfg.system_prompt,
            "generation": dataclasses.asdict(default_generation(trainer.model)),
            "step": step,
        },
    )
    if cfg.merge:
        merge_into_base(trainer.model, tokenizer, trainer.run_dir / "merged")


def merge_into_base(model: nn.Module, tokenizer: Any, out_dir: Path) -> Path:
    """Fold the adapter of this live model into its base weights (in place) and save a plain
    transformers model to `out_dir` (export.save_merged does it for a finished run's folder)."""
    if getattr(model, "is_loaded_in_4bit", False):
        raise ValueError(
            "cannot merge into a 4-bit base in place: export the adapter instead, "
            "or train without --quantize to get a merged model"
        )
    merge_adapters(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- errors and signals


def _process_started() -> float:
    import psutil

    return psutil.Process().create_time()


OOM_ADVICE = (
    "out of memory: lower the batch size or the max sequence length, raise grad_accum_steps, "
    "turn on gradient checkpointing, or use a 4-bit base (--quantize 4bit)"
)


def human_error(e: BaseException) -> str:
    text = redact(str(e) or e.__class__.__name__)
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return OOM_ADVICE
    # safetensors reports a full disk as its own error, with the OS's words in the message
    full = "no space left on device" in text.lower() or "disk quota exceeded" in text.lower()
    if full or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)):
        where = f" writing {Path(e.filename).name}" if getattr(e, "filename", None) else ""
        if getattr(e, "errno", None) == errno.EROFS:
            return f"read-only disk{where} ({text}). Fix the folder's permissions, then resume: the last good checkpoint is kept"
        return (
            f"disk full{where} ({text}). Free space (delete old runs or exports), then resume: "
            "the last good checkpoint is kept"
        )
    return text


@contextlib.contextmanager
def _signals_request_stop() -> Iterator[dict[str, str | None]]:
    """SIGTERM, and a first Ctrl-C, ask the loop to stop and save; a second Ctrl-C aborts."""
    flag: dict[str, str | None] = {"action": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_term(signum: int, frame: Any) -> None:
        flag["action"] = "stop"

    def on_int(signum: int, frame: Any) -> None:
        if flag["action"]:
            raise KeyboardInterrupt
        flag["action"] = "stop"
        print("stopping after this step and saving; Ctrl-C again aborts", file=sys.stderr, flush=True)

    old = signal.signal(signal.SIGTERM, on_term), signal.signal(signal.SIGINT, on_int)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
