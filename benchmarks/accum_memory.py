"""Peak RSS of gradient accumulation against plain small batches on the SAME rows:
`python -m benchmarks.accum_memory --variant accum2` (batch 8 in 2 micro-batches of 4) or
`--variant bs4` (the same two halves of each batch of 8, each its own optimizer step).
Run each variant in its own process (VmHWM is per process); prints one line of numbers."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accum_memory")
    p.add_argument("--variant", choices=["bs4", "accum2", "bs8"], required=True)
    p.add_argument("--data", default="examples/json_answers.jsonl")
    p.add_argument("--steps", type=int, default=6, help="batches of 8")
    p.add_argument("--precision", default="auto")
    p.add_argument("--trim", action="store_true", help="malloc_trim(0) after every backward (glibc)")
    args = p.parse_args(argv)

    from lora_studio.config import TrainConfig
    from lora_studio.data import length_grouped_batches
    from lora_studio.engine import dist
    from lora_studio.engine.loop import Trainer, prepare
    from lora_studio.engine.memory import peak_rss_mb
    from lora_studio.engine.plan import make_plan

    out = tempfile.mkdtemp(prefix="accum_mem_")
    accum = 2 if args.variant == "accum2" else 1
    cfg = TrainConfig(data=args.data, out=out, model="bundled", rank=16, dropout=0.0, batch_size=8,
                      grad_accum_steps=accum, precision=args.precision, target="all-linear",
                      checkpoint_every=0, eval_every=0)
    plan = make_plan(cfg, "cpu")
    parts = prepare(plan)
    trainer = Trainer(plan, Path(out), dist.DistEnv(), parts, report=lambda **kw: None)
    trainer.model.train()
    batches = length_grouped_batches(trainer.lengths, 8, trainer.generator)[: args.steps]
    if args.trim:
        import ctypes

        import torch

        libc, backward = ctypes.CDLL("libc.so.6"), torch.Tensor.backward

        def trimmed(self, *a, **kw):
            backward(self, *a, **kw)
            libc.malloc_trim(0)

        torch.Tensor.backward = trimmed
    before = peak_rss_mb()
    t0 = time.perf_counter()
    for ids in batches:
        if args.variant == "bs4":
            trainer.step(ids[:4])
            trainer.step(ids[4:])
        else:
            trainer.step(ids)
    print(f"{args.variant}{' trim' if args.trim else ''} MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '-')} "
          f"peak_before_steps {before:.0f} MiB  peak {peak_rss_mb():.0f} MiB  rss_now {rss_mb():.0f} MiB  "
          f"train {time.perf_counter() - t0:.1f} s  load {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
