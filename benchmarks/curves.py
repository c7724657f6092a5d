"""Cost as the work grows: tokens/s and peak memory of our engine against peft, over sequence
length, batch size and model size, on random-weight models built from configs.

    python -m benchmarks.curves                        # the three sweeps below (~25 min on 2 cores)
    python -m benchmarks.curves --sweep seq --steps 4  # one sweep
    python -m benchmarks.curves --variants ours,peft-fp32,peft-bf16

Each point trains `--steps` steps of LoRA (rank 16, all linear layers) with the bench's workers
(`variants.py`: ours with its defaults, `precision=auto`; the peft baseline as the main bench
runs it), in fresh processes that take turns step by step (`driver.run_variants`), so each peak
memory is that run's alone and a machine that gets busier slows all of them alike. The rows are
random words cut at the point's length (`max_seq_len`), so every row of a point has the same
number of tokens and no padding; like real chat rows they share the chat template's prefix
(~30 tokens), which ours computes once per batch (prefix-tree packing) and peft once per row.

tokens/s counts the steps after the first (the first pays one-time costs: kernel creation,
the packing probe); peak memory is the process's peak RSS (CUDA: allocated) over the whole
run, loading included. The models are saved once under `--models` (random weights, seed 0).

The sweeps (`SWEEPS`): sequence length 64 to 2,048 at batch 1 on the 135M shape; batch size 1
to 16 at 128 tokens on the 135M shape; model size (135M, 360M, ~0.5B) at batch 8 × 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

# Decoder shapes of public checkpoints (their configs; the weights here are random).
SHAPES: dict[str, dict[str, Any]] = {
    "135M": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,  # SmolLM2-135M
                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
    "360M": dict(arch="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,  # SmolLM2-360M
                 num_attention_heads=15, num_key_value_heads=5, vocab_size=49152, rope_theta=100000.0),
    "0.5B": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,  # Qwen2.5-0.5B
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0),
}

# sweep -> (shape, batch, seq) points
SWEEPS: dict[str, list[tuple[str, int, int]]] = {
    "seq": [("135M", 1, n) for n in (64, 128, 256, 512, 1024, 2048)],
    "batch": [("135M", b, 128) for b in (1, 2, 4, 8, 16)],
    "model": [(s, 8, 128) for s in ("135M", "360M", "0.5B")],
}

WORDS = ("river stone quiet table window garden yellow number simple market travel winter answer "
         "morning paper follow letter bright forest silver change reason little mountain second "
         "station animal bottle circle doctor energy family ground island kitchen leather minute "
         "orange pencil question rabbit summer ticket valley wonder").split()


def build_model(shape: str, folder: Path, tokenizer: Any) -> Path:
    """A random-weight causal LM of `shape`, with the bundled tokenizer, saved once in `folder`."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    fields = dict(SHAPES[shape])
    arch = fields.pop("arch")
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(**fields, tie_word_embeddings=True, max_position_embeddings=8192,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = model_cls(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    return folder


def write_rows(path: Path, rows: int, seq: int, seed: int) -> Path:
    """Rows of random words, each longer than `seq` tokens (the loader cuts them at max_seq_len)."""
    gen = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            reply = " ".join(gen.choice(WORDS) for _ in range(seq + 16))
            f.write(json.dumps({"prompt": f"Continue the list {i}.", "completion": reply}) + "\n")
    return path


def point_result(result: dict[str, Any]) -> dict[str, Any]:
    """Warm tokens/s (the steps after the first) and peak memory of one run."""
    if "error" in result:
        return {"error": result["error"]}
    ends = [t for t, _ in result["curve"]]
    steps = len(ends)
    per_step = result["tokens"] / max(1, steps)  # equal rows, no padding: every step the same
    warm_s = ends[-1] - ends[0] if steps > 1 else ends[-1]
    warm_tokens = per_step * (steps - 1) if steps > 1 else per_step
    out = {"tokens_per_s": warm_tokens / max(warm_s, 1e-9), "peak_mb": result["peak_mb"], "steps": steps,
           "tokens_per_step": per_step, "first_step_s": ends[0], "precision": result.get("precision")}
    if result.get("mfu") is not None:  # on a GPU: model FLOPs utilization against its bf16 peak (whole run)
        out["mfu"] = result["mfu"]
    return out


def run_point(shape: str, batch: int, seq: int, args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    from benchmarks.driver import run_variants
    from lora_studio.config import TrainConfig

    out = Path(args.out) / f"{shape}-b{batch}-s{seq}"
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(shape, Path(args.models) / shape, tokenizer)
    train_file = write_rows(out / "train.jsonl", batch * args.steps, seq, seed=0)
    eval_file = write_rows(out / "heldout.jsonl", 1, min(seq, 64), seed=1)
    cfg = TrainConfig(data=str(train_file), out="unused", model=str(model_dir), rank=16, dropout=0.0,
                      batch_size=batch, max_seq_len=seq, max_steps=args.steps, epochs=1.0,
                      target="all-linear", precision=args.precision).resolved().to_dict()
    specs = [{"variant": v, "label": v, "cfg": cfg, "train_file": str(train_file), "eval_file": str(eval_file),
              "threads": args.threads, "out": str(out / v), "baseline_order": "ours"} for v in args.variants]
    results = run_variants(specs, args.timeout)
    return {v: point_result(results[v]) for v in args.variants}


def markdown(points: list[dict[str, Any]], variants: list[str]) -> str:
    """One table per sweep: tokens/s and peak MiB of each variant, and ours / each baseline."""
    base = [v for v in variants if v != "ours"]
    lines: list[str] = []
    for sweep in dict.fromkeys(p["sweep"] for p in points):
        head = ["model", "batch", "seq"] + [f"{v} tok/s" for v in variants] + [f"{v} MiB" for v in variants]
        if "ours" in variants:
            head += [f"ours/{b} tok/s" for b in base] + [f"ours/{b} MiB" for b in base]
        lines += ["", f"**{sweep}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in (p for p in points if p["sweep"] == sweep):
            r = p["runs"]

            def num(v: str, key: str, spec: str) -> str:
                return format(r[v][key], spec) if key in r.get(v, {}) else "failed"

            def ratio(v: str, key: str) -> str:
                ok = key in r.get("ours", {}) and key in r.get(v, {})
                return f"{r['ours'][key] / r[v][key]:.2f}x" if ok else "-"

            cells = [p["shape"], str(p["batch"]), str(p["seq"])]
            cells += [num(v, "tokens_per_s", ".0f") for v in variants] + [num(v, "peak_mb", ".0f") for v in variants]
            if "ours" in variants:
                cells += [ratio(b, "tokens_per_s") for b in base] + [ratio(b, "peak_mb") for b in base]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.curves", description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default="seq,batch,model", help=f"comma-separated, from {', '.join(SWEEPS)}")
    p.add_argument("--variants", default="ours,peft-fp32", help="from ours, ours-fp32, peft-fp32, peft-bf16")
    p.add_argument("--steps", type=int, default=4, help="steps per run; the first is not timed")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="ours")
    p.add_argument("--out", default="runs/curves")
    p.add_argument("--models", default="runs/curves/models", help="where the random-weight models are saved")
    p.add_argument("--threads", type=int, help="torch threads per run (default: the cores this process may use)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for one step of a run")
    p.add_argument("--points", help="instead of the sweeps: SHAPE:BATCH:SEQ,... (e.g. 135M:2:64)")
    p.add_argument("--tokenizer", default="bundled", help="the tokenizer saved with the random models")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step is not timed)")

    from benchmarks.variants import VARIANTS, load_average, machine_info
    from lora_studio.models import load_tokenizer

    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    if args.points:
        todo = [("points", *_parse_point(x)) for x in args.points.split(",")]
    else:
        names = [s.strip() for s in args.sweep.split(",") if s.strip()]
        if any(s not in SWEEPS for s in names):
            p.error(f"--sweep: choose from {', '.join(SWEEPS)}")
        todo = [(s, *point) for s in names for point in SWEEPS[s]]
    machine = machine_info()
    args.threads = args.threads or machine["cores"]
    tokenizer = load_tokenizer(args.tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, Any]] = []
    for sweep, shape, batch, seq in todo:
        print(f"{sweep}: {shape} batch {batch} seq {seq} (load average {load_average()})", file=sys.stderr, flush=True)
        points.append({"sweep": sweep, "shape": shape, "batch": batch, "seq": seq, "load": load_average(),
                       "runs": run_point(shape, batch, seq, args, tokenizer)})
        report = {"machine": machine, "steps": args.steps, "variants": args.variants, "points": points}
        (out / "curves.json").write_text(json.dumps(report, indent=2) + "\n")  # after each point: nothing lost
    table = markdown(points, args.variants)
    header = (f"Machine: {machine['cpu']}, {machine['cores']} cores (bf16 products at {machine['cpu_bf16_speedup']}x "
              f"the fp32 rate); torch {machine['torch']}; {machine['date']}. {args.steps} steps a run, the first not timed.\n\n")
    (out / "curves.md").write_text(header + table)
    print(header + table)
    return 0


def _parse_point(text: str) -> tuple[str, int, int]:
    shape, batch, seq = text.strip().split(":")
    if shape not in SHAPES:
        raise SystemExit(f"--points: unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    return shape, int(batch), int(seq)


if __name__ == "__main__":
    raise SystemExit(main())
