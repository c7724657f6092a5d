"""The training loop: one plain loop (nanoGPT-style) that the CLI and the background runner share.

A run folder receives (see runfiles.py for the formats):
  config.json     the resolved TrainConfig (reload it to repeat the run)
  status.json     {"state": running|done|stopped|aborted|failed, "step", "total_steps", "error", ...}
  metrics.jsonl   one JSON object per optimizer step (eval_loss on evaluation steps)
  checkpoints/    the last resumable checkpoint (every `checkpoint_every` steps and on stop)
  adapter/        PEFT-format adapter files (+ our record of method, template, EOS)
  merged/         the merged full model, with --merge

Batches: `batch_size` sequences per optimizer step, whatever the hardware. They are split over
the DDP ranks (under torchrun) and then into `grad_accum_steps` micro-batches; every
micro-batch's summed token loss is divided by the trained-token count of the whole step, so
the update equals the one of the unsplit batch (up to float summation order).

Stopping: the loop reads RUN/control.json before each step (`stop`: save a checkpoint and the
adapter of the current step; `abort`: leave without saving); SIGTERM and a first Ctrl-C are
a `stop`. Resuming (`train(cfg, resume=True)`) restores adapter, optimizer, scheduler, RNG
states and the data position from the last checkpoint and continues bit for bit.
"""

from __future__ import annotations

import contextlib
import errno
import dataclasses
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lora_studio.adapters import save_adapter
from lora_studio.checkpoint import (
    CHECKPOINTS,
    checkpoint_tensors,
    load_latest_checkpoint,
    restore_model_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
    tmp_dir,
    write_rank_rng,
)
from lora_studio.compare import default_generation
from lora_studio.config import TrainConfig
from lora_studio.redact import redact
from lora_studio.data import (
    IGNORE_INDEX,
    build_datasets,
    check_packing,
    collate,
    length_grouped_batches,
    model_inputs,
    pack_examples,
)
from lora_studio.methods import count_parameters, get_method, inject_adapters, merge_adapters, trainable_parameters
from lora_studio.memory import estimate_for_examples
from lora_studio.methods.base import check_config
from lora_studio.models import base_model_id, load_model, load_tokenizer
from lora_studio.probes import EvalWatch
from lora_studio.precision import resolve_precision, stores_frozen_linears_in_bf16
from lora_studio.preflight import check_batch
from lora_studio.runfiles import (  # noqa: F401  (re-exported: older callers import them from here)
    METRICS,
    hostname,
    make_reserve,
    read_control,
    read_metrics,
    read_status,
    truncate_metrics,
    write_json_atomic,
    write_status,
)
from lora_studio.tracking import tracked
from lora_studio.speed import (
    fp32_attention_on_cpu,
    linear_cross_entropy,
    store_frozen_linears,
    trained_hidden_states,
)

StepCallback = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """This process's peak RSS since it started (MiB).

    Linux's VmHWM, not getrusage's ru_maxrss: ru_maxrss survives exec, so a worker spawned by
    a large app process would report the app's size as its own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Process RSS now and at peak (MiB); CUDA allocated/reserved/peak where there is a GPU."""
    import psutil

    stats = {"rss_mb": psutil.Process().memory_info().rss / 2**20, "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        stats.update(
            cuda_allocated_mb=torch.cuda.memory_allocated(device) / 2**20,
            cuda_reserved_mb=torch.cuda.memory_reserved(device) / 2**20,
            cuda_peak_mb=torch.cuda.max_memory_allocated(device) / 2**20,
        )
    return stats


# ---------------------------------------------------------------- loss


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the trained positions, and their count.

    The LM head runs only on positions that carry a label: with response-only masking
    that is a fraction of the batch, and the (tokens × vocab) logits are the largest
    activation of a small model.
    """
    labels = batch["labels"][:, 1:]  # (B, T-1): the target of position t is token t+1
    keep = labels != IGNORE_INDEX
    config = getattr(model, "config", None)
    post_processes_logits = any(
        getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    inputs = model_inputs(batch)  # packed batches: position ids instead of the 2D mask
    # fp32 attention: a no-op except under CPU bf16 autocast (see speed.py). Not with checkpointing:
    # the backward's recompute runs outside this block and must match the forward.
    checkpointing = getattr(getattr(model, "base_model", model), "gradient_checkpointing", False)
    with fp32_attention_on_cpu() if not checkpointing else contextlib.nullcontext():
        if post_processes_logits or not hasattr(model, "base_model") or model.base_model is model:
            logits = model(**inputs).logits
            logits = logits[:, :-1][keep]  # (N, V)
            loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
        else:
            if "position_ids" in inputs:
                hidden = model.base_model(**inputs).last_hidden_state[:, :-1][keep]  # (N, H)
            else:  # rows as a prefix tree: a prompt prefix they share runs once, no padding (speed.py)
                hidden = trained_hidden_states(model.base_model, batch["input_ids"], batch["attention_mask"], keep)
            # LM head and cross-entropy in chunks: never all (N, V) logits in fp32 at once.
            loss = linear_cross_entropy(hidden, model.get_output_embeddings(), labels[keep])
    return loss, int(keep.sum())


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Trained positions of a collated batch, counted as `causal_lm_loss` counts them."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class _SummedLoss(nn.Module):
    """`causal_lm_loss` as a module, so DistributedDataParallel's forward hooks see it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(self.model, batch)[0]


# ---------------------------------------------------------------- optimizer and schedule


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    method = get_method(cfg.method)
    if method.build_optimizer is not None:
        return method.build_optimizer(model, cfg)
    params = list(trainable_parameters(model).values())
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over `warmup` steps, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plan_steps(cfg: TrainConfig, n_batches: int) -> int:
    total = max(1, math.ceil(cfg.epochs * n_batches))
    return min(total, cfg.max_steps) if cfg.max_steps else total


# ---------------------------------------------------------------- devices


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing: works with a frozen input embedding and with DDP."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


@dataclass
class DistEnv:
    """Where this process sits in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_distributed() -> DistEnv:
    """Join the process group torchrun describes in the environment (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return env


def split_evenly(items: list[int], parts: int) -> list[list[int]]:
    """`parts` contiguous chunks whose sizes differ by at most one (some empty if items are few)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def shard_batch(ids: list[int], env: DistEnv, accum: int) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step's batch (empty ones dropped).

    Ranks take every world-th sample of the length-sorted batch, so their sequences are
    about as long as each other's; micro-batches are contiguous runs, so lengths within
    one are similar (little padding).
    """
    mine = ids[env.rank :: env.world]
    return [chunk for chunk in split_evenly(mine, accum) if chunk]


# ---------------------------------------------------------------- the loop


def prepare(cfg: TrainConfig, device: torch.device | None = None) -> dict[str, Any]:
    """Load model, tokenizer and data, and inject the adapter: everything before step 1."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = get_method(cfg.method)
    check_config(method, cfg)  # impossible combinations fail before anything is loaded
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples, val_examples, report = build_datasets(cfg, tokenizer)
    _, base_dtype = resolve_precision(cfg, device)
    model = load_model(cfg.model, dtype=base_dtype, trust_remote_code=cfg.trust_remote_code, quantize=cfg.quantize)
    model.to(device)
    if cfg.packing:
        check_packing(model)
        examples = pack_examples(examples, cfg.max_seq_len)
    torch.manual_seed(cfg.seed)  # adapter init
    names = inject_adapters(model, method, cfg)
    autocast_dtype, _ = resolve_precision(cfg, device)
    if stores_frozen_linears_in_bf16(cfg, autocast_dtype, base_dtype):
        store_frozen_linears(model, torch.bfloat16)
    if cfg.compile:
        model.base_model.compile(dynamic=True)  # in place: causal_lm_loss calls the body directly
    return {
        "model": model,
        "tokenizer": tokenizer,
        "examples": examples,
        "val_examples": val_examples,
        "data_report": report,
        "device": device,
        "targets": names,
    }


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
    env = DistEnv()
    try:
        env = init_distributed()
        cfg = cfg.resolved()
        if env.main:
            make_reserve(run_dir)  # before anything fills the disk (again, on a resume)
            cfg.save(run_dir / "config.json")
            write_status(
                run_dir, "running", pid=os.getpid(), pid_started=_process_started(), host=hostname(),
                started_at=time.time(), error=None, finished_at=None, world_size=env.world,
                method=cfg.method, model=cfg.model,
            )
        with (
            _signals_request_stop() as signalled,
            # each metrics row also to the tracker asked for (rank 0; nothing imported when None)
            tracked(cfg.report_to, run_dir, cfg.to_dict(), env.main, on_step) as on_step,
        ):
            return _train(cfg, run_dir, env, on_step, should_stop, resume, signalled)
    except BaseException as e:  # noqa: BLE001 - every failure must end in a truthful status
        with contextlib.suppress(OSError):  # the disk may be the thing that failed
            (run_dir / ("error.log" if env.main else f"error-rank{env.rank}.log")).write_text(redact(traceback.format_exc()))
        if not env.main:
            raise
        if isinstance(e, KeyboardInterrupt):
            write_status(run_dir, "aborted", error="interrupted (Ctrl-C)", finished_at=time.time())
            raise
        write_status(run_dir, "failed", error=human_error(e), finished_at=time.time())
        return read_status(run_dir)
    finally:
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _process_started() -> float:
    import psutil

    return psutil.Process().create_time()


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm of a step became NaN or infinite: the step is not applied."""


def diverged_message(what: str, value: float, step: int, lr: float) -> str:
    kind = "NaN" if math.isnan(value) else "infinite"
    return (
        f"training diverged: the {what} became {kind} at step {step}, so that step was not applied and "
        f"nothing of it was saved (the last good checkpoint is kept). Lower the learning rate "
        f"(now {lr:g}; try {lr / 4:g}), or check the model's weights and the data for NaN or inf"
    )


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


@dataclass
class Position:
    """Where the loop is: enough to regenerate the data order and skip what was done."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed_s: float = 0.0


class _Loop:
    """One training run's state; `run()` is the loop. Split out so resume and DDP stay readable."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, env: DistEnv, parts: dict[str, Any]) -> None:
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        self.model: nn.Module = parts["model"]
        self.tokenizer = parts["tokenizer"]
        self.examples = parts["examples"]
        self.val_examples = parts.get("val_examples") or []
        if not cfg.packing:  # the run's own split, for callers that skipped the preflight
            check_batch(cfg.batch_size, len(self.examples))
        self.device: torch.device = parts["device"]
        self.method = get_method(cfg.method)
        self.autocast_dtype, _ = resolve_precision(cfg, self.device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.epoch_start_state = self.generator.get_state()
        self.lengths = [len(e.input_ids) for e in self.examples]
        self.batches_per_epoch = math.ceil(len(self.examples) / cfg.batch_size)
        self.total_steps = plan_steps(cfg, self.batches_per_epoch)
        self.scheduler = linear_schedule(self.optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps)
        self.params = list(trainable_parameters(self.model).values())
        self.loss_module: nn.Module = _SummedLoss(self.model)
        if env.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.loss_module = DistributedDataParallel(
                self.loss_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,  # buffers are identical on every rank and never trained
            )
        self.pos = Position()
        self.last_checkpoint = -1

    # ------------------------------------------------ collectives (no-ops on one process)

    def _all_sum(self, values: list[float]) -> list[float]:
        if self.env.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _from_main(self, value: int) -> int:
        if self.env.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(t, 0)
        return int(t.item())

    def _barrier(self) -> None:
        if self.env.world > 1:
            dist.barrier()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------ one step

    def step(self, ids: list[int]) -> dict[str, Any]:
        """One optimizer step over the global batch `ids`; returns the metric row's numbers."""
        cfg = self.cfg
        pad = self.tokenizer.pad_token_id
        micro = [collate([self.examples[i] for i in chunk], pad) for chunk in shard_batch(ids, self.env, cfg.grad_accum_steps)]
        weights = [1.0] * len(micro)
        if not micro:  # fewer samples than ranks: join the gradient all-reduce with a zero loss
            micro, weights = [collate([self.examples[ids[0]]], pad)], [0.0]
        n_local = sum(count_targets(b) for b, w in zip(micro, weights) if w)
        tokens_local = sum(int(b["attention_mask"].sum()) for b, w in zip(micro, weights) if w)
        n_global, tokens_global = self._all_sum([n_local, tokens_local])
        # DDP averages gradients over ranks; multiplying by world makes that average a sum.
        factor = self.env.world / max(1.0, n_global)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for k, (batch, weight) in enumerate(zip(micro, weights)):
            batch = {key: v.to(self.device) for key, v in batch.items()}
            last = k == len(micro) - 1
            sync = contextlib.nullcontext() if last or self.env.world == 1 else self.loss_module.no_sync()
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
        """Mean token loss over the validation examples (each rank takes its share)."""
        if not self.val_examples:
            return None
        self.model.eval()
        order = sorted(range(len(self.val_examples)), key=lambda i: len(self.val_examples[i].input_ids))
        mine = order[self.env.rank :: self.env.world]
        size = max(1, self.cfg.batch_size // self.cfg.grad_accum_steps)
        total = count = 0.0
        for start in range(0, len(mine), size):
            batch = collate([self.val_examples[i] for i in mine[start : start + size]], self.tokenizer.pad_token_id)
            with self._autocast():
                loss, n = causal_lm_loss(self.model, {k: v.to(self.device) for k, v in batch.items()})
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
        self._barrier()
        write_rank_rng(folder, self.env.rank, rng_state(self.device, self.epoch_start_state))
        self._barrier()
        if self.env.main:
            optim = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            }
            trainer_state = {**asdict(self.pos), "world_size": self.env.world}
            save_checkpoint(self.run_dir, step, checkpoint_tensors(self.model, self.method), optim, trainer_state)
            write_status(self.run_dir, "running", checkpoint_step=step)
        self.last_checkpoint = step

    def restore(self) -> int | None:
        """Load the last checkpoint, if any; returns its step."""
        found = load_latest_checkpoint(self.run_dir, self.env.rank, self.device)
        if found is None:
            return None
        folder, saved, skipped = found
        if skipped and self.env.main:  # said in the status, so nobody wonders why steps repeat
            write_status(self.run_dir, "running", resume_note=f"resumed from {folder.name}; unreadable: " + "; ".join(skipped))
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


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    env: DistEnv,
    on_step: StepCallback | None,
    should_stop: Callable[[], bool] | None,
    resume: bool,
    signalled: dict[str, str | None],
) -> dict[str, Any]:
    parts = prepare(cfg, env.device())
    if env.main:
        write_json_atomic(run_dir / "data_report.json", parts["data_report"].to_dict())
    loop = _Loop(cfg, run_dir, env, parts)
    trainable, total = count_parameters(loop.model)
    resumed_from = loop.restore() if resume else None
    if env.main:
        if resumed_from is None:  # a fresh start: nothing of an earlier run in this folder carries over
            (run_dir / METRICS).write_text("")
            shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
        else:
            truncate_metrics(run_dir, resumed_from)
        write_status(
            run_dir,
            "running",
            step=loop.pos.step,
            total_steps=loop.total_steps,
            trainable_params=trainable,
            total_params=total,
            n_examples=len(loop.examples),
            n_val_examples=len(loop.val_examples),
            n_truncated=parts["data_report"].n_truncated,
            resumed_from=resumed_from,
            device=str(loop.device),
            precision=str(loop.autocast_dtype or torch.float32).replace("torch.", ""),
            memory_estimate=_estimate(cfg, loop),
        )
    return _run(loop, on_step, should_stop, signalled)


def _estimate(cfg: TrainConfig, loop: _Loop) -> dict[str, Any] | None:
    """The memory estimate for this run's largest batch; never fails the run."""
    try:
        return estimate_for_examples(cfg, loop.model, loop.examples, loop.device, loop.env.world).to_dict()
    except Exception as e:  # noqa: BLE001 - an estimate is advice, not a requirement
        return {"error": f"no estimate: {e}"}


def _stop_request(loop: _Loop, should_stop: Callable[[], bool] | None, signalled: dict[str, str | None]) -> str | None:
    """`stop`, `abort` or None, decided on rank 0 and shared, so every rank leaves together."""
    code = 0
    if loop.env.main:
        action = signalled["action"] or read_control(loop.run_dir)
        if action is None and should_stop is not None and should_stop():
            action = "stop"
        code = {"stop": 1, "abort": 2}.get(action or "", 0)
    code = loop._from_main(code)
    return {1: "stop", 2: "abort"}.get(code)


def _run(
    loop: _Loop, on_step: StepCallback | None, should_stop: Callable[[], bool] | None, signalled: dict[str, str | None]
) -> dict[str, Any]:
    cfg, run_dir, env, pos = loop.cfg, loop.run_dir, loop.env, loop.pos
    metrics_path = run_dir / METRICS
    session_start, session_first_step = time.perf_counter(), pos.step
    elapsed_before = pos.elapsed_s
    final = "done"
    # Issue 17 hook (1/3): probe answers and early stopping at each evaluation, rank 0 (lora_studio/probes.py).
    watch = EvalWatch(cfg, run_dir, loop.model, loop.tokenizer, loop.method, loop._autocast, pos.step) if env.main else None
    early_stop_step = None
    loop.model.train()
    while pos.step < loop.total_steps and final == "done" and early_stop_step is None:
        if pos.batch_in_epoch == 0:
            loop.epoch_start_state = loop.generator.get_state()
        batches = length_grouped_batches(loop.lengths, cfg.batch_size, loop.generator)
        while pos.batch_in_epoch < len(batches) and pos.step < loop.total_steps:
            action = _stop_request(loop, should_stop, signalled)
            if action is not None:
                final = "stopped" if action == "stop" else "aborted"
                break
            t0 = time.perf_counter()
            row = loop.step(batches[pos.batch_in_epoch])
            pos.batch_in_epoch += 1
            pos.step += 1
            now = time.perf_counter()
            pos.elapsed_s = elapsed_before + (now - session_start)
            done_here = pos.step - session_first_step
            row = {
                "step": pos.step,
                "epoch": pos.step / loop.batches_per_epoch,
                **row,
                "tokens_per_s": row["tokens"] / max(now - t0, 1e-9),
                "elapsed_s": pos.elapsed_s,
                "eta_s": (now - session_start) / done_here * (loop.total_steps - pos.step),
                "progress": pos.step / loop.total_steps,
                **memory_stats(loop.device),
            }
            if (cfg.eval_every and pos.step % cfg.eval_every == 0) or pos.step == loop.total_steps:
                eval_loss = loop.evaluate()
                if eval_loss is not None:
                    row["eval_loss"] = eval_loss
                # Issue 17 hook (2/3): rank 0 decides, every rank leaves together.
                if loop._from_main(int(watch.after_eval(pos.step, row) if watch is not None else 0)):
                    early_stop_step = pos.step
            if env.main:  # the row goes first: a resume truncates rows past its checkpoint
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                status = {"step": pos.step, "loss": row["loss"], "peak_rss_mb": row["peak_rss_mb"]}
                if "eval_loss" in row:
                    status["eval_loss"] = row["eval_loss"]
                if "cuda_peak_mb" in row:
                    status["cuda_peak_mb"] = row["cuda_peak_mb"]
                write_status(run_dir, "running", **status)
                if on_step is not None:
                    on_step(row)
            if early_stop_step is not None:
                break
            if cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0 and pos.step < loop.total_steps:
                loop.save_checkpoint()
        if pos.batch_in_epoch >= len(batches):
            pos.epoch += 1
            pos.batch_in_epoch = 0
    loop.model.eval()
    if final == "aborted":
        if env.main:
            write_status(run_dir, "aborted", step=pos.step, finished_at=time.time(), error=None)
        return read_status(run_dir) if env.main else {}
    if final == "stopped" and pos.step > loop.last_checkpoint and pos.step > 0:
        loop.save_checkpoint()
    # Issue 17 hook (3/3): the best evaluation's weights are the adapter saved; the status says why it stopped.
    fields: dict[str, Any] = {"step": pos.step, "finished_at": time.time()}
    best_step = watch.restore_best() if watch is not None and final == "done" else None
    if best_step is not None:
        fields.update(best_step=best_step, best_value=watch.stopper.best, watched=watch.metric)
        if early_stop_step is not None:
            fields["stop_reason"] = watch.stop_reason(early_stop_step)
    if env.main and pos.step > 0:
        _save_outputs(loop, best_step or pos.step)
    if env.main:
        if pos.step > 0:
            fields["adapter"] = str(run_dir / "adapter")
        write_status(run_dir, final, **fields)
    return read_status(run_dir) if env.main else {}


def _save_outputs(loop: _Loop, step: int) -> None:
    cfg, tokenizer = loop.cfg, loop.tokenizer
    save_adapter(
        loop.model,
        loop.run_dir / "adapter",
        cfg.to_dict(),
        base_model_id(cfg.model),
        extra={
            "base_model": cfg.model,
            "chat_template": tokenizer.chat_template,
            "eos_token": tokenizer.eos_token,
            "system_prompt": cfg.system_prompt,
            "generation": dataclasses.asdict(default_generation(loop.model)),
            "step": step,
        },
    )
    if cfg.merge:
        save_merged(loop.model, tokenizer, loop.run_dir / "merged")


def save_merged(model: nn.Module, tokenizer: Any, out_dir: Path) -> Path:
    """Fold the adapter into the base weights and save a plain transformers model."""
    if getattr(model, "is_loaded_in_4bit", False):
        raise ValueError(
            "cannot merge into a 4-bit base in place: export the adapter instead, "
            "or train without --quantize to get a merged model"
        )
    merge_adapters(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
