"""`python -m lora_studio bench`: our engine against transformers + peft on the same job.

One command runs the same fine-tuning job (model, rows, epochs, batch size, rank, targets, seed,
optimizer, schedule, clipping) several ways, each in a fresh subprocess so that peak memory
(RSS, or the CUDA peak on a GPU) belongs to that run alone. The runs load side by side and then
train in turns, one step each in round robin, so that only one computes at any moment and a
machine that gets busier during the bench slows them all alike; a run's train time is the sum
of its step times:

  ours       lora_studio.train.train with its defaults (precision auto, length-grouped batches,
             LM head on trained positions only, chunked cross-entropy)
  peft-fp32  the usual stack: transformers model + peft's default LoRA layer, a plain PyTorch
             loop over padded batches, `model(**batch).loss`, everything fp32. By default it
             takes our batches in our order (length-grouped, seeded) and our adapter init, so
             that the two runs differ in the engine only and their losses can be compared
             step for step; `--baseline-order data` feeds consecutive rows in file order.
  peft-bf16  the same loop under bf16 autocast (what an expert runs)

Every run is scored the same way afterwards, in fp32: eval loss and token accuracy (argmax =
label, teacher forced) on the same held-out rows, with the saved adapter on the fp32 base for
ours and the peft model as it stands for the baseline. Output: a markdown table (stdout and
bench.md), bench.json, and bench_loss.png/.svg (train loss against wall time for every run).

`--methods` instead trains every method of the registry for the same steps and tabulates
time, peak memory, trainable parameters and loss.

peft is needed only here (`pip install -r requirements-dev.txt`, or `pip install peft`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BASELINES = ("peft-fp32", "peft-bf16")
VARIANTS = ("ours", "ours-fp32") + BASELINES
DEFAULT_VARIANTS = ("ours",) + BASELINES
TARGETS = {
    "time_vs_peft_fp32": 0.35,
    "time_vs_peft_bf16": 0.7,
    "memory_vs_peft_fp32": 0.8,
    "eval_loss_rel_diff": 0.02,
}
PEFT_MISSING = (
    "the baseline needs peft, an optional extra: `pip install -r requirements-dev.txt` "
    "(or `pip install peft==0.21.2`); or bench our engine alone with --variants ours"
)


# ---------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import torch

    from lora_studio.speed import cpu_bf16_speedup, cpu_has_native_bf16

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

    from lora_studio.train import peak_rss_mb

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
    from lora_studio.train import read_status, train

    fields = dict(spec["cfg"], data=spec["train_file"], out=str(out / "run"))
    if spec["variant"] == "ours-fp32":
        fields["precision"] = "fp32"
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
                  precision=status.get("precision"))
    # Score the artifact a user gets: the saved adapter on the full-precision base.
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model).to(device)
    load_adapter(model, Path(cfg.out) / "adapter")
    held_out = held_out_examples(cfg, tokenizer, spec["eval_file"])
    result.update(evaluate(model, held_out, tokenizer.pad_token_id, cfg.batch_size, device))
    result["flops_per_token"] = model_flops_per_token(model)
    return result


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

    cfg = TrainConfig.from_dict(dict(spec["cfg"], data=spec["train_file"], out=str(out))).resolved()
    bf16 = spec["variant"] == "peft-bf16"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    examples, _, _ = build_datasets(cfg, tokenizer)  # the rows and tokens our engine trains on
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
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * per_epoch))
    total = min(total, cfg.max_steps) if cfg.max_steps else total
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
                  precision="bfloat16" if bf16 else "float32")
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
        run = run_peft if spec["variant"] in BASELINES else run_ours
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


# ---------------------------------------------------------------- the driver


def split_rows(data: str, eval_data: str | None, eval_fraction: float, seed: int, out: Path) -> tuple[str, str, int, int]:
    """Write the train and held-out files every run reads (the same rows for all), as JSONL
    whatever the source's kind (the columns, and so the detected format, are kept)."""
    from lora_studio.data import DataError, read_source

    def rows_of(source: str) -> list[dict[str, Any]]:
        raw = read_source(source)
        if raw.problems:
            raise DataError("; ".join(str(p) for p in raw.problems[:5]), raw.problems)
        return raw.rows

    rows = rows_of(data)
    if eval_data:
        train, held = rows, rows_of(eval_data)
    else:
        if len(rows) < 2:
            raise ValueError(f"{data}: need at least 2 rows to hold some out (or pass --eval-data)")
        n_held = min(len(rows) - 1, max(1, round(eval_fraction * len(rows))))
        held_ids = set(random.Random(seed).sample(range(len(rows)), n_held))
        train = [r for i, r in enumerate(rows) if i not in held_ids]
        held = [r for i, r in enumerate(rows) if i in held_ids]
    out.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = out / "train.jsonl", out / "heldout.jsonl"
    for path, part in ((train_file, train), (eval_file, held)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    return str(train_file), str(eval_file), len(train), len(held)


def run_variants(specs: list[dict[str, Any]], timeout: float = 1800.0) -> dict[str, dict[str, Any]]:
    """Run the specs in fresh Python processes, loaded side by side, training in turns: one step
    of each in round robin (see Turns), then one evaluation after the other."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    runs: dict[str, dict[str, Any]] = {}
    for spec in specs:
        out = Path(spec["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").unlink(missing_ok=True)
        go_r, go_w = os.pipe()
        back_r, back_w = os.pipe()
        spec = dict(spec, turn_fds=[go_r, back_w])
        (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        if spec.get("threads"):
            env["OMP_NUM_THREADS"] = str(spec["threads"])
        proc = subprocess.Popen(
            [sys.executable, "-m", "lora_studio.bench", "--worker", str(out / "spec.json")],
            env=env, pass_fds=(go_r, back_w), stdout=subprocess.DEVNULL,
        )
        os.close(go_r)
        os.close(back_w)
        runs[spec["label"]] = {"spec": spec, "proc": proc, "go": os.fdopen(go_w, "w"), "back": os.fdopen(back_r, "r"),
                               "state": "loading", "t0": time.perf_counter()}

    def ask(run: dict[str, Any], say: bool = True) -> str:
        """Send a go (unless `say` is False) and wait for the answer; "" when the worker died,
        "timeout" after `timeout` s. The worker's process is checked every second, so a dead
        one is noticed even if something else still holds its end of the pipe."""
        if say:
            try:
                run["go"].write("go\n")
                run["go"].flush()
            except BrokenPipeError:
                return ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([run["back"]], [], [], 1.0)
            if ready:
                return run["back"].readline().strip()
            if run["proc"].poll() is not None:  # it may have answered just before it ended
                ready, _, _ = select.select([run["back"]], [], [], 0)
                return run["back"].readline().strip() if ready else ""
        return "timeout"

    for run in runs.values():  # wait until every run has loaded (loading is not timed)
        run["state"] = "training" if ask(run, say=False) == "ready" else "gone"
    while any(run["state"] == "training" for run in runs.values()):
        for run in runs.values():
            if run["state"] == "training":
                answer = ask(run)
                if answer != "stepped":
                    run["state"] = "trained" if answer == "trained" else "gone"
    for run in runs.values():  # evaluations, one at a time
        if run["state"] == "trained":
            ask(run)
    results: dict[str, dict[str, Any]] = {}
    for label, run in runs.items():
        run["go"].close()
        try:
            run["proc"].wait(timeout=60)
        except subprocess.TimeoutExpired:
            run["proc"].kill()
            run["proc"].wait()
        path = Path(run["spec"]["out"]) / "result.json"
        if path.exists():
            results[label] = json.loads(path.read_text())
        else:
            results[label] = {"variant": run["spec"]["variant"], "label": label,
                              "error": f"the run's process ended with code {run['proc'].returncode} and no result"}
        results[label]["process_s"] = time.perf_counter() - run["t0"]
        run["back"].close()
    return results


def ratios(ours: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    def r(key: str) -> float:
        return ours[key] / base[key] if base.get(key) else math.nan

    def step_times(result: dict[str, Any]) -> list[float]:
        ends = [t for t, _ in result["curve"]]
        return [b - a for a, b in zip([0.0, *ends], ends)]

    # Both runs take the same batches in the same order (the default): step i of one and step i
    # of the other did the same work, and the median of their ratios shrugs off a step that
    # another process on the machine slowed down.
    paired = [a / b for a, b in zip(step_times(ours), step_times(base)) if b > 0]
    return {
        "time": r("train_s"),
        "time_paired_median": statistics.median(paired) if paired else math.nan,
        "tokens_per_s": r("tokens_per_s"),
        "memory": r("peak_mb"),
        "eval_loss": r("eval_loss"),
        "eval_token_acc_diff": ours["eval_token_acc"] - base["eval_token_acc"],
    }


def check_targets(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's targets for our LoRA, where the runs they need are present and succeeded."""
    ok = {k: v for k, v in results.items() if "error" not in v}
    checks: dict[str, dict[str, Any]] = {}
    if "ours" not in ok:
        return checks
    ours = ok["ours"]
    if "peft-fp32" in ok:
        base = ok["peft-fp32"]
        value = ours["train_s"] / base["train_s"]
        checks["time <= 0.35x peft fp32"] = {"value": value, "met": value <= TARGETS["time_vs_peft_fp32"]}
        value = ours["peak_mb"] / base["peak_mb"]
        checks["peak memory <= 0.8x peft fp32"] = {"value": value, "met": value <= TARGETS["memory_vs_peft_fp32"]}
        value = ours["eval_loss"] / base["eval_loss"] - 1
        checks["eval loss within 2% of peft fp32"] = {"value": value, "met": abs(value) <= TARGETS["eval_loss_rel_diff"]}
        # "Same accuracy": no more than one held-out token (or 1 point) apart.
        value = ours["eval_token_acc"] - base["eval_token_acc"]
        slack = max(0.01, 1.0 / max(1, base["eval_tokens"]))
        checks["same held-out token accuracy as peft fp32"] = {"value": value, "met": value >= -slack}
    if "peft-bf16" in ok:
        value = ours["train_s"] / ok["peft-bf16"]["train_s"]
        checks["time <= 0.7x peft bf16"] = {"value": value, "met": value <= TARGETS["time_vs_peft_bf16"]}
        if ours.get("precision") == "bfloat16":
            # bf16 autocast alone moves the eval loss by a few % (peft-bf16 against peft-fp32): where
            # ours ran in bf16 (`auto` on a CPU with fast bf16), also judge it against the same precision.
            value = ours["eval_loss"] / ok["peft-bf16"]["eval_loss"] - 1
            checks["eval loss within 2% of peft bf16 (same precision)"] = {
                "value": value, "met": abs(value) <= TARGETS["eval_loss_rel_diff"]}
    return checks


# ---------------------------------------------------------------- output


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    job = report["job"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f" (native bf16: {'yes' if m['cpu_native_bf16'] else 'no'}; bf16 products at "
        f"{m.get('cpu_bf16_speedup', float('nan')):.2f}× the fp32 rate); torch {m['torch']}; {m['date']}.",
        f"Job: model {job['model']}, {job['train_rows']} training rows ({job['data']}), {job['eval_rows']} held-out rows, "
        f"{job['epochs']} epoch(s), batch {job['batch_size']}, rank {job['rank']}, alpha {job['alpha']}, "
        f"targets {job['target']}, dropout {job['dropout']}, lr {job['lr']}, seed {job['seed']}, {job['threads']} threads; "
        + ("the baseline takes our batches in our order and starts from our adapter init."
           if job.get("baseline_order", "ours") == "ours" else "the baseline takes consecutive rows in file order."),
        "",
        "| run | precision | steps | train time (s) | CPU time (s) | tokens/s | peak memory (MiB) "
        "| train loss (last 5 steps) | eval loss | eval token acc | eval reply acc | load avg before → after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:200]} |||||||||||")
            continue
        load = f"{_fmt((r.get('load_before') or [None])[0], '.2f')} → {_fmt((r.get('load_after') or [None])[0], '.2f')}"
        lines.append(
            f"| {name} | {r.get('precision') or '–'} | {r['steps']} | {_fmt(r['train_s'], '.1f')} | {_fmt(r.get('cpu_s'), '.1f')} "
            f"| {_fmt(r['tokens_per_s'], '.0f')} "
            f"| {_fmt(r['peak_mb'], '.0f')} | {_fmt(r['final_loss'], '.4f')} | {_fmt(r['eval_loss'], '.4f')} "
            f"| {_fmt(r['eval_token_acc'], '.3f')} | {_fmt(r['eval_reply_acc'], '.3f')} | {load} |"
        )
    if report.get("ratios"):
        paired = report["job"].get("baseline_order", "ours") == "ours"
        lines += ["", "| ours / baseline | time | step time (median of step-by-step ratios) | tokens/s | peak memory "
                  "| eval loss | token acc (diff) |", "|---|---|---|---|---|---|---|"]
        for base, r in report["ratios"].items():
            lines.append(
                f"| ours / {base} | {_fmt(r['time'], '.2f')}x "
                f"| {_fmt(r['time_paired_median'], '.2f') + 'x' if paired else '– (different batches)'} "
                f"| {_fmt(r['tokens_per_s'], '.2f')}x "
                f"| {_fmt(r['memory'], '.2f')}x | {_fmt(r['eval_loss'], '.3f')}x | {_fmt(r['eval_token_acc_diff'], '+.3f')} |"
            )
    if report.get("targets"):
        lines += ["", "| target | value | met |", "|---|---|---|"]
        for name, t in report["targets"].items():
            lines.append(f"| {name} | {_fmt(t['value'], '.3f')} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def methods_markdown(report: dict[str, Any]) -> str:
    m, job = report["machine"], report["job"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}; {m['date']}. "
        f"Each method: {job['steps']} steps of batch {job['batch_size']} on {job['data']} "
        f"(model {job['model']}, method defaults for rank/alpha/lr), {job['threads']} threads.",
        "",
        "| method | train time (s) | peak memory (MiB) | trainable params | train loss (last 5 steps) | eval loss | eval token acc | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:200]} |||||||")
            continue
        lines.append(
            f"| {name} | {_fmt(r['train_s'], '.1f')} | {_fmt(r['peak_mb'], '.0f')} | {r['trainable_params']:,} "
            f"| {_fmt(r['final_loss'], '.4f')} | {_fmt(r['eval_loss'], '.4f')} | {_fmt(r['eval_token_acc'], '.3f')} "
            f"| {_fmt((r.get('load_before') or [None])[0], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def _plot_items(results: dict[str, dict[str, Any]], title: str) -> tuple[int, int, list[tuple]]:
    """Train loss against wall time for every run, as drawing items shared by the SVG and the PNG:
    ("line", x1, y1, x2, y2, color, width), ("poly", points, color), ("text", x, y, text, anchor)."""
    curves = {k: v["curve"] for k, v in results.items() if v.get("curve")}
    width, height, left, right, top, bottom = 760, 450, 64, 170, 48, 48
    t_max = max((c[-1][0] for c in curves.values()), default=1.0) or 1.0
    losses = [p[1] for c in curves.values() for p in c if math.isfinite(p[1])]
    y_max, y_min = max(losses, default=1.0), min(0.0, min(losses, default=0.0))
    w, h = width - left - right, height - top - bottom

    def xy(t: float, y: float) -> tuple[float, float]:
        return left + w * t / t_max, top + h * (1 - (y - y_min) / ((y_max - y_min) or 1.0))

    items: list[tuple] = [
        ("text", width / 2, 20, title, "middle"),
        ("line", left, top + h, left + w, top + h, "#000000", 1),
        ("line", left, top, left, top + h, "#000000", 1),
        ("text", left + w / 2, height - 10, "wall time of the training loop (s)", "middle"),
        ("text", 8, top - 14, "train loss", "start"),
    ]
    for i in range(6):
        x, _ = xy(t_max * i / 5, y_min)
        items += [("line", x, top + h, x, top + h + 4, "#000000", 1), ("text", x, top + h + 18, f"{t_max * i / 5:.{0 if t_max >= 20 else 1}f}", "middle")]
        y_val = y_min + (y_max - y_min) * i / 5
        _, y = xy(0, y_val)
        items += [("line", left - 4, y, left, y, "#000000", 1), ("line", left, y, left + w, y, "#e0e0e0", 1),
                  ("text", left - 7, y + 4, f"{y_val:.1f}", "end")]
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, (name, curve) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        items.append(("poly", [xy(t, v) for t, v in curve if math.isfinite(v)], color))
        ly = top + 14 + 20 * i
        items += [("line", left + w + 12, ly - 4, left + w + 34, ly - 4, color, 3), ("text", left + w + 40, ly, name, "start")]
    return width, height, items


def loss_svg(results: dict[str, dict[str, Any]], title: str) -> str:
    width, height, items = _plot_items(results, title)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="{width}" height="{height}" fill="white"/>']
    for item in items:
        if item[0] == "line":
            _, x1, y1, x2, y2, color, lw = item
            out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" stroke-width="{lw}"/>')
        elif item[0] == "poly":
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in item[1])
            out.append(f'<polyline fill="none" stroke="{item[2]}" stroke-width="2" points="{points}"/>')
        else:
            _, x, y, text, anchor = item
            out.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{_escape(text)}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def loss_png(results: dict[str, dict[str, Any]], title: str, path: Path) -> bool:
    """The same plot as a PNG, with Pillow (installed with gradio); False when Pillow is missing."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return False
    width, height, items = _plot_items(results, title)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        font = ImageFont.load_default()
    for item in items:
        if item[0] == "line":
            _, x1, y1, x2, y2, color, lw = item
            draw.line([(x1, y1), (x2, y2)], fill=color, width=lw)
        elif item[0] == "poly":
            if len(item[1]) > 1:
                draw.line(item[1], fill=item[2], width=2, joint="curve")
        else:
            _, x, y, text, anchor = item
            draw.text((x, y), text, fill="black", font=font, anchor={"start": "ls", "middle": "ms", "end": "rs"}[anchor])
    tmp = path.with_name("." + path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return True


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _base_cfg(args: argparse.Namespace) -> dict[str, Any]:
    from lora_studio.config import TrainConfig

    cfg = TrainConfig(
        data=args.data, out="unused", model=args.model, method=args.method, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, max_seq_len=args.max_seq_len, target=args.target, seed=args.seed,
        precision=args.precision,
    )
    return cfg.resolved().to_dict()


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the variants named in args.variants; write bench.json, bench.md, loss.svg under args.out."""
    out = Path(args.out)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if any(v in BASELINES for v in variants):
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise ValueError(PEFT_MISSING)
    train_file, eval_file, n_train, n_eval = split_rows(args.data, args.eval_data, args.eval_fraction, args.seed, out)
    cfg = _base_cfg(args)
    threads = args.threads or machine_info()["cores"]
    print(f"running {', '.join(variants)} in turns, {threads} threads each (load average {load_average()})",
          file=sys.stderr, flush=True)
    specs = [{"variant": v, "label": v, "cfg": cfg, "train_file": train_file, "eval_file": eval_file,
              "threads": threads, "out": str(out / v), "baseline_order": args.baseline_order} for v in variants]
    results = run_variants(specs, args.timeout)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "job": {**{k: cfg[k] for k in ("model", "method", "rank", "alpha", "dropout", "lr", "epochs", "max_steps",
                                       "batch_size", "max_seq_len", "target", "seed", "precision")},
                "data": args.data, "train_rows": n_train, "eval_rows": n_eval, "threads": threads,
                "baseline_order": args.baseline_order},
        "results": results,
    }
    ok = {k: v for k, v in results.items() if "error" not in v}
    if "ours" in ok:
        report["ratios"] = {b: ratios(ok["ours"], ok[b]) for b in BASELINES if b in ok}
    report["targets"] = check_targets(results)
    _write_outputs(out, report, markdown(report), "train loss vs wall time")
    return report


def bench_methods(args: argparse.Namespace) -> dict[str, Any]:
    """Every method of the registry, the same steps each, one fresh process per method."""
    from lora_studio.methods import REGISTRY

    out = Path(args.out)
    train_file, eval_file, n_train, n_eval = split_rows(args.data, args.eval_data, args.eval_fraction, args.seed, out)
    threads = args.threads or machine_info()["cores"]
    steps = args.max_steps or 10
    results: dict[str, dict[str, Any]] = {}
    specs = []
    for name in REGISTRY:
        method_args = argparse.Namespace(**{**vars(args), "method": name, "rank": None, "alpha": None, "lr": None,
                                            "dropout": None, "max_steps": steps})
        try:
            cfg = _base_cfg(method_args)
        except ValueError as e:
            results[name] = {"variant": "ours", "label": name, "error": str(e)}
            continue
        specs.append({"variant": "ours", "label": name, "cfg": cfg, "train_file": train_file, "eval_file": eval_file,
                      "threads": threads, "out": str(out / "methods" / name)})
    # In turns, a few at a time: each holds a model in memory while it waits.
    for start in range(0, len(specs), args.group):
        group = specs[start : start + args.group]
        print(f"running {', '.join(s['label'] for s in group)} in turns (load average {load_average()})",
              file=sys.stderr, flush=True)
        results.update(run_variants(group, args.timeout))
    results = {name: results[name] for name in REGISTRY if name in results}
    report = {
        "machine": machine_info(),
        "job": {"model": args.model, "data": args.data, "steps": steps, "batch_size": args.batch_size,
                "train_rows": n_train, "eval_rows": n_eval, "threads": threads, "precision": args.precision},
        "results": results,
    }
    _write_outputs(out, report, methods_markdown(report), f"train loss vs wall time, {steps} steps per method",
                   stem="methods")
    return report


def _write_outputs(out: Path, report: dict[str, Any], table: str, title: str, stem: str = "bench") -> None:
    from lora_studio.train import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{stem}.json", report)
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}_loss.svg").write_text(loss_svg(report["results"], title))
    wrote = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}_loss.svg"]
    if loss_png(report["results"], title, out / f"{stem}_loss.png"):
        wrote.append(out / f"{stem}_loss.png")
    print(table)
    print("wrote " + ", ".join(str(p) for p in wrote))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time our engine against transformers + peft on the same job")
    p.add_argument("--model", default="bundled")
    p.add_argument("--data", default="examples/json_answers.jsonl")
    p.add_argument("--eval-data", dest="eval_data", help="held-out rows (default: hold out --eval-fraction of --data)")
    p.add_argument("--eval-fraction", dest="eval_fraction", type=float, default=0.1)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--methods", action="store_true", help="instead: every method of the registry, the same steps each")
    p.add_argument("--method", default="lora", help="our method in the bench (the baseline is always peft's LoRA)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", dest="max_steps", type=int, help="stop every run after N steps (--methods: default 10)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--max-seq-len", dest="max_seq_len", type=int, default=512)
    p.add_argument("--target", default="all-linear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="ours (default auto)")
    p.add_argument("--baseline-order", dest="baseline_order", choices=["ours", "data"], default="ours",
                   help="the baseline's batches: ours (the same length-grouped batches in the same order, so "
                   "only the engines differ) or data (consecutive rows in file order)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: the cores this process may use)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for one step of a run")
    p.add_argument("--group", type=int, default=4, help="--methods: how many methods train in turns at once")


def cmd_bench(args: argparse.Namespace) -> int:
    report = bench_methods(args) if args.methods else bench(args)
    failed = [k for k, v in report["results"].items() if "error" in v]
    return 1 if failed and len(failed) == len(report["results"]) else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2]))
    parser = argparse.ArgumentParser(prog="python -m lora_studio.bench")
    add_parser(parser.add_subparsers(dest="command", required=True))
    sys.exit(cmd_bench(parser.parse_args(["bench", *sys.argv[1:]])))
