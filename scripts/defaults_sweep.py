"""Do a method's defaults teach? Exact match after one epoch on a date-rewriting task.

    python scripts/defaults_sweep.py [--rows 400] [--heldout 100] [--precision auto]
        [--runs "lora;dora;vera;dora:lr=2e-4,rank=16;vera:lr=1e-2"]

A no-code user picks a method and keeps its defaults, so each method's defaults must teach
about as much as LoRA's on an ordinary instruction task. The task here: rewrite a written
date ("March 5, 2021", "5 Mar 2021", ...) as ISO 8601 ("2021-03-05"); `--rows` rows,
one epoch, batch 8, on the bundled model (SmolLM2-135M-Instruct). Score: greedy replies to
`--heldout` unseen dates, exact match after stripping whitespace. Each `--runs` entry is a
method with optional overrides (`method:key=value,...`); without overrides it runs with the
method's own defaults. Prints a markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
INSTRUCTION = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Reply with the date only."


def date_rows(n: int, seed: int) -> list[dict]:
    """n distinct rows as chat messages: a written date in one of four styles -> ISO."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n:
        y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        style = rng.randrange(4)
        if (y, m, d, style) in seen:
            continue
        seen.add((y, m, d, style))
        month = MONTHS[m - 1]
        written = [f"{month} {d}, {y}", f"{d} {month[:3]} {y}", f"{d} {month} {y}", f"{month[:3]}. {d}, {y}"][style]
        rows.append({"messages": [{"role": "user", "content": f"{INSTRUCTION}\n{written}"},
                                  {"role": "assistant", "content": f"{y:04d}-{m:02d}-{d:02d}"}]})
    return rows


def parse_run(spec: str) -> tuple[str, dict]:
    method, _, rest = spec.partition(":")
    over = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        over[key.strip()] = float(value) if key.strip() in ("lr", "alpha", "lr_ratio", "dropout") else int(value)
    return method.strip(), over


def exact_match(run_dir: Path, rows: list[dict], batch: int = 25) -> float:
    import torch

    from lora_studio.adapters import load_adapter
    from lora_studio.models import load_model, load_tokenizer

    tok = load_tokenizer("bundled")
    tok.padding_side = "left"
    model = load_model("bundled")
    load_adapter(model, run_dir / "adapter")
    model.eval()
    hits = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        prompts = [tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True) for r in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        for r, ids in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
            hits += tok.decode(ids, skip_special_tokens=True).strip() == r["messages"][1]["content"]
    return hits / len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--runs", default="lora;dora;vera")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from lora_studio.config import TrainConfig
    from lora_studio.engine.run import train

    rows = date_rows(args.rows + args.heldout, args.seed)
    train_rows, held = rows[: args.rows], rows[args.rows :]
    work = Path(tempfile.mkdtemp(prefix="defaults-sweep-"))
    data = work / "dates.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; precision {args.precision}; "
          f"{args.rows} rows, 1 epoch, batch 8; exact match on {args.heldout} held-out dates", flush=True)
    print("| run | rank | alpha | lr | final loss | exact match | train s |\n|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for i, spec in enumerate(filter(None, args.runs.split(";"))):
        method, over = parse_run(spec)
        cfg = TrainConfig(data=str(data), out=str(work / f"run{i}"), model="bundled", method=method, epochs=1,
                          batch_size=8, max_seq_len=128, precision=args.precision, seed=args.seed,
                          checkpoint_every=0, **over)
        t0 = time.time()
        status = train(cfg)
        seconds = time.time() - t0
        if status["state"] != "done":
            print(f"| {spec} | failed: {status.get('error')} |", flush=True)
            continue
        used = json.loads((work / f"run{i}" / "config.json").read_text())
        em = exact_match(work / f"run{i}", held)
        print(f"| {spec} | {used['rank']} | {used['alpha']:g} | {used['lr']:g} | {status.get('loss', float('nan')):.3f} "
              f"| {em:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
