"""Every method of the registry on the bundled model (SmolLM2-135M-Instruct), side by side.

    python scripts/methods_table.py [--steps 10] [--batch-size 4] [--max-seq-len 128]
                                    [--out docs/methods_table.md] [--no-4bit] [--methods lora,dora]

Each method trains with its own defaults (rank, alpha, lr; what the studio gives a user who
sets nothing) for the same N steps on examples/json_answers.jsonl, same seed, so every method
sees the same batches. One process per method, so "peak RSS" is that run's own. Columns:

  trainable     trainable parameters (and their share of the model)
  activations   bytes autograd keeps for backward on the first batch (saved_tensors_hooks,
                parameters left out): the memory LoRA-FA saves
  optimizer     AdamW state after one step (2 moments per trainable number)
  peak RSS      the training process's peak resident memory (model, data, Python: mostly shared)
  loss          training loss at step 1 and step N, and the held-out loss after training
                (examples/json_answers_heldout.jsonl, answers in the trained JSON format)

Memory columns are measured, not computed; on CPU, peak RSS is dominated by the model
itself, so the activation and optimizer columns show the differences between methods.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = ROOT / "examples" / "json_answers.jsonl"
HELDOUT = ROOT / "examples" / "json_answers_heldout.jsonl"
QLORA = "lora@4bit"


def _saved_bytes(model, batch) -> int:
    """Bytes of the tensors autograd saves for backward in one step (unique storages, no parameters)."""
    import torch

    from lora_studio.engine.loss import causal_lm_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
    return sum(seen.values())


def heldout_loss(model, tokenizer, max_seq_len: int) -> float:
    """Mean token loss of the held-out answers (the reply as the training data writes it)."""
    import torch

    from lora_studio.data import alpaca_to_messages, collate, read_jsonl, tokenize_conversation
    from lora_studio.engine.loss import causal_lm_loss

    rows = read_jsonl(HELDOUT)
    convs = [
        alpaca_to_messages({"instruction": r["prompt"], "output": json.dumps({"answer": r["expected"]})}, f"row {i}")
        for i, r in enumerate(rows, 1)
    ]
    examples = [tokenize_conversation(tokenizer, c, max_seq_len) for c in convs]
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            batch = collate(examples[start : start + 8], tokenizer.pad_token_id)
            loss, n = causal_lm_loss(model, batch)
            total += loss.item()
            count += n
    return total / count


def run_one(name: str, steps: int, batch_size: int, max_seq_len: int) -> dict:
    """Train one method in this process and measure it."""
    import torch

    from lora_studio.adapters import load_adapter
    from lora_studio.config import TrainConfig
    from lora_studio.data import collate
    from lora_studio.methods import get_method
    from lora_studio.models import load_model, load_tokenizer
    from lora_studio.engine.loop import prepare
    from lora_studio.engine.plan import make_plan
    from lora_studio.engine.run import train

    method, quantize = (name.split("@")[0], "4bit") if "@" in name else (name, None)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            data=str(DATA), out=tmp, method=method, quantize=quantize, max_steps=steps,
            batch_size=batch_size, max_seq_len=max_seq_len, seed=0,
        )
        status = train(cfg)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if status["state"] != "done":
            raise RuntimeError(f"{name}: {status.get('error')}")
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        resolved = TrainConfig.load(Path(tmp) / "config.json")
        tokenizer = load_tokenizer("bundled")
        tuned = load_model("bundled", quantize=quantize)
        load_adapter(tuned, Path(tmp) / "adapter")
        loss_heldout = heldout_loss(tuned, tokenizer, max_seq_len)
    # Memory of one step, measured on a fresh copy: the first training batch, saved tensors, optimizer state.
    parts = prepare(make_plan(resolved))
    model = parts["model"]
    model.train()
    batch = collate(parts["examples"][:batch_size], tokenizer.pad_token_id)
    activations = _saved_bytes(model, batch)
    optimizer = get_method(resolved.method).make_optimizer(model, resolved)
    optimizer.step()
    state = sum(
        t.numel() * t.element_size()
        for per_param in optimizer.state.values()
        for t in per_param.values()
        if torch.is_tensor(t) and t.dim() > 0  # moments, not the step counter
    )
    return {
        "method": get_method(method).title + (" on 4-bit base (QLoRA)" if quantize else ""),
        "name": name,
        "rank": resolved.rank,
        "lr": resolved.lr,
        "trainable": status["trainable_params"],
        "total": status["total_params"],
        "activations_mb": activations / 2**20,
        "optimizer_mb": state / 2**20,
        "peak_rss_mb": peak_rss,
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "loss_heldout": loss_heldout,
        # Kept out of the table: on a shared CPU, wall time says more about the neighbours.
        "s_per_step": rows[-1]["elapsed_s"] / len(rows),
    }


def base_row(max_seq_len: int) -> dict:
    from lora_studio.models import load_model, load_tokenizer

    loss = heldout_loss(load_model("bundled"), load_tokenizer("bundled"), max_seq_len)
    return {"loss_heldout": loss}


def markdown(rows: list[dict], base: dict, args: argparse.Namespace) -> str:
    lines = [
        f"# Methods on the bundled model: {args.steps} steps, batch {args.batch_size}, max_seq_len {args.max_seq_len}",
        "",
        f"Made by `python scripts/methods_table.py` ({os.cpu_count()}-core CPU, float32, seed 0, each method with "
        "its own defaults; same data order for all). Activations: bytes autograd saves for backward on the first batch; "
        "optimizer: AdamW state; peak RSS: the whole training process. Loss: training loss at step 1 "
        f"and step {args.steps}, and mean token loss on examples/json_answers_heldout.jsonl after training "
        f"(base model: {base['loss_heldout']:.3f}).",
        "",
        "| method | rank | lr | trainable params | activations MiB | optimizer MiB | peak RSS MiB "
        f"| loss step 1 | loss step {args.steps} | held-out loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = 100 * r["trainable"] / r["total"]
        lines.append(
            f"| {r['method']} | {r['rank']} | {r['lr']:g} | {r['trainable']:,} ({share:.2f}%) | "
            f"{r['activations_mb']:.1f} | {r['optimizer_mb']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['loss_first']:.3f} | {r['loss_last']:.3f} | {r['loss_heldout']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from lora_studio.methods import REGISTRY

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--methods", default=",".join(REGISTRY), help="comma-separated registry names")
    p.add_argument("--no-4bit", action="store_true", help="skip the LoRA-on-NF4 (QLoRA) row")
    p.add_argument("--out", default=str(ROOT / "docs" / "methods_table.md"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: one method, JSON on stdout
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.batch_size, args.max_seq_len)))
        return 0
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.no_4bit:
        names.append(QLORA)
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len)]
        print(f"[{len(rows) + 1}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = markdown(rows, base_row(args.max_seq_len), args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("." + out.name + ".tmp")
    tmp.write_text(table)
    tmp.replace(out)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
