"""The training loop: one plain loop (nanoGPT-style), the same for the CLI, the background runner
and torchrun. `prepare(plan)` loads everything before step 1; a `Trainer` then runs `fit()`.

Batches: `batch_size` sequences per optimizer step, whatever the hardware. They are split over
the DDP ranks (under torchrun) and then into `grad_accum_steps` micro-batches; every
micro-batch's summed token loss is divided by the trained-token count of the whole step, so
the update equals the one of the unsplit batch (up to float summation order).

Several processes: `plan.strategy` ddp wraps the loss in DistributedDataParallel; fsdp shards
model, gradients and optimizer state with FSDP2 (engine/fsdp.py). The FSDP parts are marked
`[FSDP hook N]`: the model left on CPU for sharding (prepare), sharding instead of DDP, no
no_sync, the DTensor grad norm, an equal count of eval forwards, sharded checkpoints saved and
restored (hooks 0 and 8: plan.py and run.py).

Resuming (`Trainer.restore`) restores adapter, optimizer, scheduler, RNG states and the data
position from the last checkpoint, and the run continues bit for bit.

The Trainer writes metrics.jsonl and checkpoints; it never writes status.json: what the status
must say goes through `report` (run.py is the one writer).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lora_studio import runfiles as rf
from lora_studio.data import build_datasets, check_packing, collate, length_grouped_batches, pack_examples
from lora_studio.engine import dist, fsdp
from lora_studio.engine.checkpoint import (
    checkpoint_tensors,
    load_latest_checkpoint,
    restore_model_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
    tmp_dir,
    write_rank_rng,
)
from lora_studio.engine.autocompile import AutoCompile
from lora_studio.engine.loss import _SummedLoss, causal_lm_loss, count_targets
from lora_studio.engine.memory import memory_stats
from lora_studio.engine.optim import linear_schedule, plan_steps
from lora_studio.engine.plan import Plan
from lora_studio.engine.speed import compile_regions, compile_seconds, store_frozen_linears
from lora_studio.methods import inject_adapters, trainable_parameters
from lora_studio.models import load_model, load_tokenizer
from lora_studio.preflight import check_batch
from lora_studio.probes import EvalWatch
from lora_studio.runfiles import METRICS

StepCallback = Callable[[dict[str, Any]], None]
Report = Callable[..., None]
"""(**fields) -> None: status fields of the running run (rank 0 writes them; see run.py)."""
StopRequest = Callable[[], "str | None"]
"""() -> `stop`, `abort` or None, the same on every rank: asked before each step."""


def prepare(plan: Plan) -> dict[str, Any]:
    """Load model, tokenizer and data, and inject the adapter: everything before step 1."""
    cfg, device = plan.cfg, plan.device
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples, val_examples, report = build_datasets(cfg, tokenizer)
    model = load_model(cfg.model, dtype=plan.base_dtype, trust_remote_code=cfg.trust_remote_code, quantize=cfg.quantize)
    if not plan.sharded:  # [FSDP hook 1] fully_shard moves only this rank's shard to the device
        model.to(device)
    if cfg.packing:
        check_packing(model)
        examples = pack_examples(examples, cfg.max_seq_len)
    torch.manual_seed(cfg.seed)  # adapter init
    names = inject_adapters(model, plan.method, cfg)
    if plan.frozen_linears_bf16:
        store_frozen_linears(model, torch.bfloat16, spare=plan.strategy == "single")
    if cfg.compile is True:  # each decoder layer in place, one compiled code for all (causal_lm_loss calls the body)
        compile_regions(model)  # (`auto` decides after the first steps: Trainer.auto_compile)
    return {
        "model": model,
        "tokenizer": tokenizer,
        "examples": examples,
        "val_examples": val_examples,
        "data_report": report,
        "device": device,
        "targets": names,
    }


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing: works with a frozen input embedding and with DDP."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm of a step became NaN or infinite: the step is not applied."""


def diverged_message(what: str, value: float, step: int, lr: float) -> str:
    kind = "NaN" if math.isnan(value) else "infinite"
    return (
        f"training diverged: the {what} became {kind} at step {step}, so that step was not applied and "
        f"nothing of it was saved (the last good checkpoint is kept). Lower the learning rate "
        f"(now {lr:g}; try {lr / 4:g}), or check the model's weights and the data for NaN or inf"
    )


@dataclass
class Position:
    """Where the loop is: enough to regenerate the data order and skip what was done."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed_s: float = 0.0


class Trainer:
    """One training run's state: `step`, `evaluate`, `fit`, `save_checkpoint`, `restore`."""

    def __init__(self, plan: Plan, run_dir: Path, env: dist.DistEnv, parts: dict[str, Any], report: Report) -> None:
        cfg = plan.cfg
        self.plan, self.cfg, self.run_dir, self.env, self.report = plan, cfg, run_dir, env, report
        self.method, self.device, self.autocast_dtype = plan.method, plan.device, plan.autocast_dtype
        self.model: nn.Module = parts["model"]
        self.tokenizer = parts["tokenizer"]
        self.examples = parts["examples"]
        self.val_examples = parts.get("val_examples") or []
        if not cfg.packing:  # the run's own split, for callers that skipped the preflight
            check_batch(cfg.batch_size, len(self.examples))
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.sharded = plan.sharded
        self.loss_module: nn.Module = _SummedLoss(self.model)
        if self.sharded:
            # [FSDP hook 2] instead of DDP: shard each decoder layer and the loss module as root (its
            # forward is what the loop calls, so its hook gathers embeddings and LM head). Before the
            # optimizer: fully_shard replaces the parameters by sharded DTensor ones.
            self.loss_module = fsdp.shard_model(self.loss_module, fsdp.decoder_layers(self.model), self.autocast_dtype)
        self.optimizer = self.method.make_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.epoch_start_state = self.generator.get_state()
        self.lengths = [len(e.input_ids) for e in self.examples]
        self.batches_per_epoch = math.ceil(len(self.examples) / cfg.batch_size)
        self.total_steps = plan_steps(cfg, self.batches_per_epoch)
        self.scheduler = linear_schedule(self.optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps)
        self.params = list(trainable_parameters(self.model).values())
        if not self.sharded:
            self.loss_module = dist.wrap_for_ranks(self.loss_module, env, self.device)
        self.pos = Position()
        self.last_checkpoint = -1
        self.watch: EvalWatch | None = None  # probes and early stopping (rank 0), made by fit()
        self.early_stop_step: int | None = None
        self.auto_compile = AutoCompile(cfg, self.model, self.device, env.world, compile_regions, compile_seconds,
                                        self.autocast_dtype)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _all_sum(self, values: list[float]) -> list[float]:
        return dist.all_sum(values, self.env, self.device)

    # ------------------------------------------------ the loop

    def fit(self, stop_requested: StopRequest, on_step: StepCallback | None = None) -> str:
        """Train to `total_steps`, or until a stop/abort request; returns `done`, `stopped` or `aborted`.

        A stop saves a checkpoint of the current step (if the last one is older); an abort saves nothing.
        """
        cfg, pos = self.cfg, self.pos
        session_start, session_first_step, elapsed_before = time.perf_counter(), pos.step, pos.elapsed_s
        if self.env.main:  # after restore(): a resume keeps the probe answers up to its checkpoint
            self.watch = EvalWatch(cfg, self.run_dir, self.model, self.tokenizer, self.method, self._autocast, pos.step)
        self.model.train()
        while pos.step < self.total_steps:
            if pos.batch_in_epoch == 0:
                self.epoch_start_state = self.generator.get_state()
            batches = length_grouped_batches(self.lengths, cfg.batch_size, self.generator)
            while pos.batch_in_epoch < len(batches) and pos.step < self.total_steps:
                action = stop_requested()
                if action is not None:
                    return self._leave(rf.STOPPED if action == "stop" else rf.ABORTED)
                t0 = time.perf_counter()
                compile_note = None
                try:
                    numbers = self.step(batches[pos.batch_in_epoch])
                except TrainingDiverged:
                    raise
                except Exception as e:  # noqa: BLE001 - only the step that compiles is retried, eagerly
                    if not self.auto_compile.untried:
                        raise
                    compile_note = self.auto_compile.fall_back(e)
                    self.optimizer.zero_grad(set_to_none=True)
                    numbers = self.step(batches[pos.batch_in_epoch])
                pos.batch_in_epoch += 1
                pos.step += 1
                now = time.perf_counter()
                pos.elapsed_s = elapsed_before + (now - session_start)
                row = {
                    "step": pos.step,
                    "epoch": pos.step / self.batches_per_epoch,
                    **numbers,
                    "tokens_per_s": numbers["tokens"] / max(now - t0, 1e-9),
                    "elapsed_s": pos.elapsed_s,
                    "eta_s": (now - session_start) / (pos.step - session_first_step) * (self.total_steps - pos.step),
                    "progress": pos.step / self.total_steps,
                    **self._memory_per_rank(),
                }
                compiled = cfg.compile is True or self.auto_compile.active  # this step ran compiled layers
                compile_note = self.auto_compile.after_step(now - t0, self.total_steps - pos.step) or compile_note
                if compile_note:
                    row["compile"] = compile_note
                if compiled:  # compiled lazily, in the first steps
                    row["compile_s"] = compile_seconds()
                if (cfg.eval_every and pos.step % cfg.eval_every == 0) or pos.step == self.total_steps:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        row["eval_loss"] = eval_loss
                    if self.after_eval(pos.step, row):
                        self.early_stop_step = pos.step
                self.log(row, on_step)
                if self.early_stop_step is not None:
                    return self._leave(rf.DONE)
                if cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0 and pos.step < self.total_steps:
                    self.save_checkpoint()
            if pos.batch_in_epoch >= len(batches):
                pos.epoch += 1
                pos.batch_in_epoch = 0
        return self._leave(rf.DONE)

    def after_eval(self, step: int, row: dict[str, Any]) -> bool:
        """Probes answered and early stopping asked after an evaluation (adds what it scored to
        `row`); True: stop now. Rank 0 decides, every rank leaves together."""
        stop = self.watch.after_eval(step, row) if self.watch is not None else False
        if not self.cfg.early_stop:
            return False
        return bool(dist.from_main(int(stop), self.env, self.device))

    def restore_best(self) -> int | None:
        """With early stopping, the best evaluation's weights back in the model; returns its step."""
        return self.watch.restore_best() if self.watch is not None else None

    def _leave(self, final: str) -> str:
        self.model.eval()
        if final == rf.STOPPED and self.pos.step > self.last_checkpoint and self.pos.step > 0:
            self.save_checkpoint()
        return final

    def _memory_per_rank(self) -> dict[str, Any]:
        """This rank's memory stats, and with several ranks every rank's peak (`rank_peak_mb`, the
        CUDA peak on GPUs, else peak RSS): the memory chart shows each, FSDP's gain is per rank."""
        stats: dict[str, Any] = memory_stats(self.device)
        if self.env.world > 1:
            slots = [0.0] * self.env.world
            slots[self.env.rank] = stats.get("cuda_peak_mb", stats["peak_rss_mb"])
            stats["rank_peak_mb"] = self._all_sum(slots)
        return stats

    def log(self, row: dict[str, Any], on_step: StepCallback | None) -> None:
        """The step's metrics row to metrics.jsonl, the status and `on_step` (rank 0)."""
        if not self.env.main:
            return
        with (self.run_dir / METRICS).open("a") as fh:  # the row goes first: a resume truncates rows past its checkpoint
            fh.write(json.dumps(row) + "\n")
        status = {"step": row["step"], "loss": row["loss"], "peak_rss_mb": row["peak_rss_mb"]}
        for key in ("eval_loss", "cuda_peak_mb", "compile_s", "compile"):
            if key in row:
                status[key] = row[key]
        self.report(**status)
        if on_step is not None:
            on_step(row)

    # ------------------------------------------------ one step

    def step(self, ids: list[int]) -> dict[str, Any]:
        """One optimizer step over the global batch `ids`; returns the metric row's numbers."""
        cfg, env = self.cfg, self.env
        pad = self.tokenizer.pad_token_id
        micro = [collate([self.examples[i] for i in chunk], pad) for chunk in dist.shard_batch(ids, env, cfg.grad_accum_steps)]
        weights = [1.0] * len(micro)
        if not micro:  # fewer samples than ranks: join the gradient all-reduce with a zero loss
            micro, weights = [collate([self.examples[ids[0]]], pad)], [0.0]
        n_local = sum(count_targets(b) for b, w in zip(micro, weights) if w)
        tokens_local = sum(int(b["attention_mask"].sum()) for b, w in zip(micro, weights) if w)
        n_global, tokens_global = self._all_sum([n_local, tokens_local])
        # DDP averages gradients over ranks; multiplying by world makes that average a sum.
        factor = env.world / max(1.0, n_global)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for k, (batch, weight) in enumerate(zip(micro, weights)):
            batch = {key: v.to(self.device) for key, v in batch.items()}
            last = k == len(micro) - 1
            # [FSDP hook 3] FSDP reduce-scatters every micro-batch into the sharded gradients (no
            # no_sync: keeping whole unsharded gradients would cost the memory FSDP saves)
            quiet = not last and env.world > 1 and not self.sharded
            sync = self.loss_module.no_sync() if quiet else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    summed = self.loss_module(batch)
                scaled = summed * (factor * weight)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += summed.detach().double() * weight
        (loss_total,) = self._all_sum([float(loss_sum)])
        step = self.pos.step + 1
        if not math.isfinite(loss_total):  # every rank sees the same sum: all leave together
            raise TrainingDiverged(diverged_message("loss", loss_total, step, cfg.lr))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or float("inf"))
        grad_norm = fsdp.full_norm(grad_norm)  # [FSDP hook 4] over DTensor gradients: a DTensor
        if self.scaler is None and not math.isfinite(float(grad_norm)):
            # (fp16's scaler skips an overflowing step itself and lowers its scale: a rare inf is
            # expected there, and `scaler.step` below applies nothing for it.)
            raise TrainingDiverged(diverged_message("gradient norm", float(grad_norm), step, cfg.lr))
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.method.after_step is not None:
            self.method.after_step(self.model, cfg, self.pos.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {
            "loss": loss_total / max(1.0, n_global),
            "lr": lrs[0],
            "lrs": lrs,
            "grad_norm": float(grad_norm),
            "tokens": int(tokens_global),
            "trained_tokens": int(n_global),
        }

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over the validation examples (each rank takes its share); None without any."""
        if not self.val_examples:
            return None
        self.model.eval()
        order = sorted(range(len(self.val_examples)), key=lambda i: len(self.val_examples[i].input_ids))
        mine = order[self.env.rank :: self.env.world]
        size = self.plan.eval_batch
        total = count = 0.0
        starts = list(range(0, len(mine), size))
        if self.sharded:  # [FSDP hook 5] each forward gathers weights with every rank: same count of calls
            most = math.ceil(math.ceil(len(order) / self.env.world) / size)
            starts += [-1] * (most - len(starts))  # -1: a dummy batch whose loss is not counted
        for start in starts:
            ids = mine[start : start + size] if start >= 0 else order[:1]
            batch = collate([self.val_examples[i] for i in ids], self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast():
                if self.sharded:
                    loss, n = self.loss_module(batch), count_targets(batch)
                else:
                    loss, n = causal_lm_loss(self.model, batch)
            if start >= 0:
                total += float(loss)
                count += n
        total, count = self._all_sum([total, count])
        self.model.train()
        return total / max(1.0, count)

    # ------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        step = self.pos.step
        folder = tmp_dir(self.run_dir, step)
        if self.env.main and folder.exists():  # left by a crash during an earlier save
            shutil.rmtree(folder)
        dist.barrier(self.env)
        write_rank_rng(folder, self.env.rank, rng_state(self.device, self.epoch_start_state))
        if self.sharded:  # [FSDP hook 6] each rank writes its shard of adapter and optimizer (DCP)
            fsdp.save_sharded_checkpoint(self.loss_module, self.optimizer, folder)
        dist.barrier(self.env)
        if self.env.main:
            optim = {
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            }
            if not self.sharded:
                optim["optimizer"] = self.optimizer.state_dict()
            trainer_state = {**asdict(self.pos), "world_size": self.env.world, "strategy": self.plan.strategy}
            tensors = {} if self.sharded else checkpoint_tensors(self.model, self.method)
            save_checkpoint(self.run_dir, step, tensors, optim, trainer_state)
            self.report(checkpoint_step=step)
        self.last_checkpoint = step

    def restore(self) -> int | None:
        """Load the last checkpoint, if any; returns its step."""
        found = load_latest_checkpoint(self.run_dir, self.env.rank, self.device)
        if found is None:
            return None
        folder, saved, skipped = found
        if skipped and self.env.main:  # said in the status, so nobody wonders why steps repeat
            self.report(resume_note=f"resumed from {folder.name}; unreadable: " + "; ".join(skipped))
        if fsdp.has_sharded_checkpoint(folder) != self.sharded:
            was = "sharded (--strategy fsdp)" if fsdp.has_sharded_checkpoint(folder) else "whole (one process or ddp)"
            raise ValueError(f"{folder.name} is {was}: resume it with the strategy it was written with")
        if self.sharded:  # [FSDP hook 7] every rank reads its shard (DCP reshards for another world size)
            fsdp.load_sharded_checkpoint(self.loss_module, self.optimizer, folder)
        else:
            restore_model_tensors(self.model, saved["model"], self.method)
            self.optimizer.load_state_dict(saved["optimizer"]["optimizer"])
        self.scheduler.load_state_dict(saved["optimizer"]["scheduler"])
        if self.scaler is not None and saved["optimizer"].get("scaler"):
            self.scaler.load_state_dict(saved["optimizer"]["scaler"])
        state = saved["state"]
        self.pos = Position(state["step"], state["epoch"], state["batch_in_epoch"], state["elapsed_s"])
        self.epoch_start_state = saved["rng"]["data_epoch_start"]
        self.generator.set_state(self.epoch_start_state)
        set_rng_state(saved["rng"], self.device)
        self.last_checkpoint = self.pos.step
        return self.pos.step
