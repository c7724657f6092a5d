"""What one worker process runs: our engine or the peft baseline on the job of its spec, taking
turns with the other runs step by step (Turns), then scored on the held-out rows in fp32."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

BASELINES = ("peft-fp32", "peft-bf16")
# QLoRA, each engine over a 4-bit (NF4) base: ours (`quantize: 4bit`) against peft + bitsandbytes'
# usual recipe (prepare_model_for_kbit_training). Not in the default set: meant for a GPU.
QLORA = ("ours-qlora", "peft-qlora")
PEFT_VARIANTS = BASELINES + ("peft-qlora",)
VARIANTS = ("ours", "ours-fp32") + BASELINES + QLORA
DEFAULT_VARIANTS = ("ours",) + BASELINES
PEFT_MISSING = (
    "the baseline needs peft, an optional extra: `pip install -r requirements-dev.txt` "
    "(or `pip install peft==0.21.2`); or bench our engine alone with --variants ours"
)


# ---------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import torch

    from lora_studio.engine.speed import cpu_bf16_speedup, cpu_has_native_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_bf16_speedup": round(cpu_bf16_speedup(), 2),  # fp32 / bf16 time of one product, one core
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return []


# ---------------------------------------------------------------- shared by the workers


def peak_memory_mb(device: Any) -> float:
    """Peak RSS of this process (this run alone: each run has its own process), or the CUDA peak."""
    import torch

    from lora_studio.engine.memory import peak_rss_mb

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def held_out_examples(cfg: Any, tokenizer: Any, path: str) -> list[Any]:
    """The held-out rows as examples, through the same reading and tokenizing as training."""
    from lora_studio.data import ensure_chat_template, load_examples, parse_columns

    ensure_chat_template(tokenizer)
    examples, _ = load_examples(path, tokenizer, fmt=cfg.format, columns=parse_columns(cfg.columns),
                                system_prompt=cfg.system_prompt, max_seq_len=cfg.max_seq_len)
    return examples


def evaluate(model: Any, examples: list[Any], pad_id: int, batch_size: int, device: Any) -> dict[str, float]:
    """Held-out loss (mean CE over reply tokens) and accuracy, in fp32 without autocast:
    `eval_token_acc` = share of reply tokens whose argmax is the label (teacher forced),
    `eval_reply_acc` = share of replies with every token right."""
    import torch
    import torch.nn.functional as F

    from lora_studio.data import IGNORE_INDEX, collate

    model.eval()
    loss_sum, n_tokens, n_right, n_replies_right = 0.0, 0, 0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, :-1].float()  # (B, T-1, V)
            labels = batch["labels"][:, 1:]  # (B, T-1)
            keep = labels != IGNORE_INDEX
            loss_sum += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            right = (logits.argmax(-1) == labels) & keep  # (B, T-1)
            n_tokens += int(keep.sum())
            n_right += int(right.sum())
            n_replies_right += int((right.sum(1) == keep.sum(1)).sum())
    return {
        "eval_loss": loss_sum / max(1, n_tokens),
        "eval_token_acc": n_right / max(1, n_tokens),
        "eval_reply_acc": n_replies_right / max(1, len(examples)),
        "eval_tokens": n_tokens,
    }


def model_flops_per_token(model: Any) -> int:
    """Model FLOPs of one training token on a frozen base: forward 2·N plus the input gradients
    2·N, N = the weights used in products (every parameter except the input embedding table;
    the LM head counts even when tied). Attention's T² terms are left out (short sequences)."""
    params = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    n = params - embeddings.weight.numel()
    if head is not None and head.weight is embeddings.weight:
        n += head.weight.numel()
    return 4 * n


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tail = [r["loss"] for r in rows[-5:]]
    train_s = sum(r["step_s"] for r in rows)
    cpu_s = sum(r["cpu_s"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    elapsed, curve = 0.0, []
    for r in rows:
        elapsed += r["step_s"]
        curve.append([round(elapsed, 3), round(r["loss"], 5)])
    return {
        "steps": len(rows),
        "train_s": train_s,
        "cpu_s": cpu_s,
        "tokens": tokens,
        "tokens_per_s": tokens / max(train_s, 1e-9),
        "first_loss": rows[0]["loss"] if rows else math.nan,
        "final_loss": sum(tail) / max(1, len(tail)),
        "curve": curve,
        "spans": [r["span"] for r in rows],  # wall-clock start and end of each step
    }


# ---------------------------------------------------------------- the runs (in a worker process)


class Turns:
    """The worker's side of taking turns: wait for the driver's go before each step, report after.

    Runs take turns step by step, so only one of them computes at any moment and a machine that
    gets busier or quieter during the bench slows or speeds every run alike. Standalone (no
    pipes), every call returns at once.
    """

    def __init__(self, fds: list[int] | None, label: str) -> None:
        self.rx = os.fdopen(fds[0], "r") if fds else None
        self.tx = os.fdopen(fds[1], "w") if fds else None
        self.label = label
        self.rows: list[dict[str, Any]] = []
        self._started = False
        self._owed = False  # a go was taken for a step that has not answered yet
        self._t0 = self._c0 = self._at = 0.0

    def send(self, message: str) -> None:
        if self.tx is not None:
            self.tx.write(message + "\n")
            self.tx.flush()

    def wait(self) -> None:
        if self.rx is not None and not self.rx.readline():
            raise SystemExit("the bench driver went away")

    def before_step(self) -> bool:
        """Called before each step (as train()'s should_stop: never asks to stop)."""
        if not self._started:
            self._started = True
            self.send("ready")
        self.wait()
        self._owed = True
        self._t0, self._c0, self._at = time.perf_counter(), time.process_time(), time.time()
        return False

    def after_step(self, row: dict[str, Any]) -> None:
        """Called after each step with its `loss` and `tokens`."""
        step_s, cpu_s = time.perf_counter() - self._t0, time.process_time() - self._c0
        self.rows.append({"loss": row["loss"], "tokens": row["tokens"], "step_s": step_s, "cpu_s": cpu_s,
                          "span": [self._at, self._at + step_s]})
        n = len(self.rows)
        if n == 1 or n % 10 == 0:
            elapsed = sum(r["step_s"] for r in self.rows)
            print(f"  {self.label}: step {n} loss {row['loss']:.4f} ({elapsed:.1f} s)", file=sys.stderr, flush=True)
        self._owed = False
        self.send("stepped")

    def finished_training(self) -> None:
        if not self._started:  # failed before the first step: still take part in the handshake
            self._started = True
            self.send("ready")
        if not self._owed:  # else a step failed after its go: the driver awaits its answer now
            self.wait()
        self._owed = False
        self.send("trained")
        self.wait()  # evaluation goes one run at a time too


def run_ours(spec: dict[str, Any], out: Path, turns: Turns) -> dict[str, Any]:
    import torch

    from lora_studio.adapters import load_adapter
    from lora_studio.config import TrainConfig
    from lora_studio.models import load_model, load_tokenizer
    from lora_studio.engine.run import train
    from lora_studio.runfiles import read_status

    fields = dict(spec["cfg"], data=spec["train_file"], out=str(out / "run"))
    if spec["variant"] == "ours-fp32":
        fields["precision"] = "fp32"
    if spec["variant"] == "ours-qlora":
        fields["quantize"] = "4bit"
    cfg = TrainConfig.from_dict(fields)
    t0 = time.perf_counter()
    status = train(cfg, on_step=turns.after_step, should_stop=turns.before_step)
    total_s = time.perf_counter() - t0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_memory_mb(device)
    turns.finished_training()
    if status.get("state") != "done":
        raise RuntimeError(f"training failed: {status.get('error')}")
    result = _summary(turns.rows)
    status = read_status(cfg.out)
    result.update(total_s=total_s, peak_mb=peak, trainable_params=status.get("trainable_params"),
                  precision=status.get("precision"), compile=_compile_decision(cfg, status))
    # Score the artifact a user gets: the saved adapter on the full-precision base.
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model).to(device)
    load_adapter(model, Path(cfg.out) / "adapter")
    held_out = held_out_examples(cfg, tokenizer, spec["eval_file"])
    result.update(evaluate(model, held_out, tokenizer.pad_token_id, cfg.batch_size, device))
    result["flops_per_token"] = model_flops_per_token(model)
    return result


def _compile_decision(cfg: Any, status: dict[str, Any]) -> str:
    """What the run's `compile` setting came to, as its status says (`auto` decides after its
    first eager steps; a shorter run stayed eager)."""
    if status.get("compile"):
        return status["compile"]
    return {True: "on", False: "off"}.get(cfg.compile, f"{cfg.compile}: eager (the run ended before it decided)")


def run_peft(spec: dict[str, Any], out: Path, turns: Turns) -> dict[str, Any]:
    """The baseline: transformers + peft's LoRA, a plain loop, padded batches in data order."""
    import torch

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RuntimeError(PEFT_MISSING) from None
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

    from lora_studio.config import TrainConfig
    from lora_studio.data import build_datasets, collate, length_grouped_batches
    from lora_studio.models import load_tokenizer, resolve_model_path
    from lora_studio.engine.optim import plan_steps

    cfg = TrainConfig.from_dict(dict(spec["cfg"], data=spec["train_file"], out=str(out))).resolved()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    qlora = spec["variant"] == "peft-qlora"
    # QLoRA computes in bf16 on a GPU (as ours does there), in fp32 on a CPU (as ours does there).
    bf16 = spec["variant"] == "peft-bf16" or (qlora and device.type == "cuda")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    examples, _, _ = build_datasets(cfg, tokenizer)  # the rows and tokens our engine trains on
    if qlora:
        from peft import prepare_model_for_kbit_training

        from lora_studio.methods.qlora import quantization_config

        compute = torch.bfloat16 if bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(cfg.model), dtype=compute, quantization_config=quantization_config(compute),
            device_map={"": device})  # fmt: skip
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model), dtype=torch.float32).to(device)
    target: Any = "all-linear" if cfg.target == "all-linear" else [t.strip() for t in cfg.target.split(",")]
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
        use_rslora=cfg.use_rslora, task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    same_init_as_ours(model, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = plan_steps(cfg, math.ceil(len(examples) / cfg.batch_size))  # the engine's own count
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(cfg.seed)  # our loop's batch order, epoch after epoch
    lengths = [len(e.input_ids) for e in examples]
    model.train()
    step = 0
    while step < total:
        if spec.get("baseline_order") == "data":
            batches = [list(range(i, min(i + cfg.batch_size, len(examples)))) for i in range(0, len(examples), cfg.batch_size)]
        else:
            batches = length_grouped_batches(lengths, cfg.batch_size, generator)
        for ids in batches:
            if step >= total:
                break
            turns.before_step()
            chunk = [examples[i] for i in ids]
            batch = {k: v.to(device) for k, v in collate(chunk, tokenizer.pad_token_id).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            turns.after_step({"loss": loss.item(), "tokens": int(batch["attention_mask"].sum())})
    total_s = time.perf_counter() - t0
    peak = peak_memory_mb(device)
    turns.finished_training()
    result = _summary(turns.rows)
    result.update(total_s=total_s, peak_mb=peak, trainable_params=sum(p.numel() for p in params),
                  precision=("nf4 + " if qlora else "") + ("bfloat16" if bf16 else "float32"))
    held_out = held_out_examples(cfg, tokenizer, spec["eval_file"])
    result.update(evaluate(model, held_out, tokenizer.pad_token_id, cfg.batch_size, device))
    result["flops_per_token"] = model_flops_per_token(model)
    return result


def same_init_as_ours(model: Any, seed: int) -> int:
    """Draw peft's lora_A matrices as our LoRA draws them (seed, then kaiming-uniform(a=√5) layer
    by layer in module order; B = 0), so both start from the same adapter and only the engines
    differ. peft's distribution is the same; its draws interleave with nn.Linear's own init."""
    import torch

    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    n = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    torch.nn.init.kaiming_uniform_(module.lora_A[name].weight, a=math.sqrt(5))
                    torch.nn.init.zeros_(module.lora_B[name].weight)
                    n += 1
    return n


def worker(spec_path: str) -> int:
    """Entry point of one subprocess: run one variant, write its result JSON."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    turns = Turns(spec.get("turn_fds"), spec["label"])
    load_before = load_average()
    try:
        run = run_peft if spec["variant"] in PEFT_VARIANTS else run_ours
        result = run(spec, out, turns)
        if torch.cuda.is_available():
            result["mfu"] = mfu(result, torch.cuda.get_device_name(0))
    except Exception as e:  # noqa: BLE001 - reported in the table, the other runs go on
        result = {"error": f"{e.__class__.__name__}: {e}"}
    result.update(variant=spec["variant"], label=spec["label"], threads=torch.get_num_threads(),
                  load_before=load_before, load_after=load_average())
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    turns.send("done")
    return 0


# Dense bf16 peaks (TFLOP/s) for the model FLOPs utilization on the GPUs we may be lent.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}


def mfu(result: dict[str, Any], gpu: str) -> float | None:
    peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in gpu), None)
    if peak is None or "tokens_per_s" not in result:
        return None
    return result["tokens_per_s"] * result["flops_per_token"] / (peak * 1e12)

