"""The training loop: one plain loop (nanoGPT-style) that the CLI and the background runner share.

A run folder receives:
  config.json     the resolved TrainConfig (reload it to repeat the run)
  status.json     {"state": running|done|failed|stopped, "step", "total_steps", "error", ...}
  metrics.jsonl   one JSON object per optimizer step
  adapter/        PEFT-format adapter files (+ our record of method, template, EOS)
  merged/         the merged full model, with --merge
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lora_studio.adapters import save_adapter
from lora_studio.config import TrainConfig
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
from lora_studio.models import base_model_id, load_model, load_tokenizer

StepCallback = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------- run folder files


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def write_status(run_dir: Path, state: str, **fields: Any) -> None:
    path = run_dir / "status.json"
    status = json.loads(path.read_text()) if path.exists() else {}
    status.update(fields, state=state, updated_at=time.time())
    write_json_atomic(path, status)


def read_status(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_metrics(run_dir: str | Path, since: int = 0) -> list[dict[str, Any]]:
    """Metric rows with step > since (a half-written last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) > since:
            rows.append(row)
    return rows


# ---------------------------------------------------------------- memory


def memory_stats(device: torch.device) -> dict[str, float]:
    """Process RSS now and at peak (MiB); CUDA allocated/reserved/peak where there is a GPU."""
    import psutil

    stats = {
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }
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
    if post_processes_logits or not hasattr(model, "base_model") or model.base_model is model:
        logits = model(**inputs).logits
        logits = logits[:, :-1][keep]  # (N, V)
    else:
        hidden = model.base_model(**inputs)
        hidden = hidden.last_hidden_state[:, :-1][keep]  # (N, H)
        logits = model.get_output_embeddings()(hidden)  # (N, V)
    loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
    return loss, int(keep.sum())


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


# ---------------------------------------------------------------- the loop


def prepare(cfg: TrainConfig, device: torch.device | None = None) -> dict[str, Any]:
    """Load model, tokenizer and data, and inject the adapter: everything before step 1."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = get_method(cfg.method)
    if cfg.quantize == "4bit" and not method.supports_4bit:
        raise ValueError(f"{method.title} cannot train on a 4-bit base: {method.why_not_4bit}")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples, val_examples, report = build_datasets(cfg, tokenizer)
    model = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, quantize=cfg.quantize)
    model.to(device)
    if cfg.packing:
        check_packing(model)
        examples = pack_examples(examples, cfg.max_seq_len)
    torch.manual_seed(cfg.seed)  # adapter init
    names = inject_adapters(model, method, cfg)
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
) -> dict[str, Any]:
    """Run one training job into `cfg.out`; returns the final status. Never raises for a
    failed run: the error is written to status.json and returned."""
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        cfg = cfg.resolved()
        cfg.save(run_dir / "config.json")
        write_status(run_dir, "running", pid=os.getpid(), started_at=time.time(), step=0, error=None)
        return _train(cfg, run_dir, on_step, should_stop)
    except Exception as e:  # noqa: BLE001 - every failure must end in a truthful status
        (run_dir / "error.log").write_text(traceback.format_exc())
        write_status(run_dir, "failed", error=human_error(e))
        return read_status(run_dir)


def human_error(e: BaseException) -> str:
    text = str(e) or e.__class__.__name__
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return (
            "out of memory: lower the batch size or the max sequence length, "
            "or use a 4-bit base (--quantize 4bit)"
        )
    return text


def _train(
    cfg: TrainConfig, run_dir: Path, on_step: StepCallback | None, should_stop: Callable[[], bool] | None
) -> dict[str, Any]:
    parts = prepare(cfg)
    model, tokenizer, examples, device = parts["model"], parts["tokenizer"], parts["examples"], parts["device"]
    write_json_atomic(run_dir / "data_report.json", parts["data_report"].to_dict())
    method = get_method(cfg.method)
    trainable, total = count_parameters(model)
    optimizer = build_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    lengths = [len(e.input_ids) for e in examples]
    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = plan_steps(cfg, batches_per_epoch)
    scheduler = linear_schedule(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    write_status(
        run_dir,
        "running",
        total_steps=total_steps,
        trainable_params=trainable,
        total_params=total,
        n_examples=len(examples),
        n_truncated=parts["data_report"].n_truncated,
    )
    model.train()
    params = list(trainable_parameters(model).values())
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    start = time.perf_counter()
    step = 0
    state = "done"
    while step < total_steps:
        for batch_ids in length_grouped_batches(lengths, cfg.batch_size, generator):
            if step >= total_steps:
                break
            if should_stop is not None and should_stop():
                state = "stopped"
                break
            t0 = time.perf_counter()
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in batch_ids], tokenizer.pad_token_id).items()}
            loss_sum, n_tokens = causal_lm_loss(model, batch)
            loss = loss_sum / max(1, n_tokens)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            lrs = [group["lr"] for group in optimizer.param_groups]
            optimizer.step()
            if method.after_step is not None:
                method.after_step(model, cfg, step + 1)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            now = time.perf_counter()
            elapsed = now - start
            row = {
                "step": step,
                "epoch": step / batches_per_epoch,
                "loss": loss.item(),
                "lr": lrs[0],
                "lrs": lrs,
                "grad_norm": float(grad_norm),
                "tokens": int(batch["attention_mask"].sum()),
                "trained_tokens": n_tokens,
                "tokens_per_s": float(batch["attention_mask"].sum()) / max(now - t0, 1e-9),
                "elapsed_s": elapsed,
                "eta_s": elapsed / step * (total_steps - step),
                "progress": step / total_steps,
                **memory_stats(device),
            }
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            write_status(run_dir, "running", step=step)
            if on_step is not None:
                on_step(row)
        if state == "stopped":
            break
    model.eval()
    save_adapter(
        model,
        run_dir / "adapter",
        cfg.to_dict(),
        base_model_id(cfg.model),
        extra={
            "base_model": cfg.model,
            "chat_template": tokenizer.chat_template,
            "eos_token": tokenizer.eos_token,
            "system_prompt": cfg.system_prompt,
            "step": step,
        },
    )
    if cfg.merge:
        save_merged(model, tokenizer, run_dir / "merged")
    write_status(run_dir, state, step=step, finished_at=time.time(), adapter=str(run_dir / "adapter"))
    return read_status(run_dir)


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
