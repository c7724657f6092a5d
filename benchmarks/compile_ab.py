"""Eager against regional compilation (one compiled decoder layer, reused by every layer) on the
bench job, step for step in one process: `python -m benchmarks.compile_ab [--steps 12] [--precision bf16]`.

Each batch runs twice, once eager and once compiled, the order alternating from batch to batch,
so a machine that gets busier slows both alike (the step also updates the adapter twice: the
timings are what is compared, not the losses). Prints the compile time (first compiled step minus
the eager one), the number of compiled graphs and recompiles, and the median step times."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_ab")
    p.add_argument("--data", default="examples/json_answers.jsonl")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--dynamic", default="true", choices=["true", "false", "none"])
    p.add_argument("--eager-only", action="store_true", help="no compile: a baseline for the eager side")
    args = p.parse_args(argv)

    import torch
    import torch._dynamo.utils as dutils

    from lora_studio.config import TrainConfig
    from lora_studio.data import length_grouped_batches
    from lora_studio.engine import dist
    from lora_studio.engine.loop import Trainer, prepare
    from lora_studio.engine.plan import make_plan
    from lora_studio.engine.speed import compile_regions

    out = tempfile.mkdtemp(prefix="compile_ab_")
    cfg = TrainConfig(data=args.data, out=out, model="bundled", rank=16, dropout=0.0, batch_size=args.batch_size,
                      precision=args.precision, target="all-linear", checkpoint_every=0, eval_every=0)
    plan = make_plan(cfg, "cpu")
    parts = prepare(plan)
    trainer = Trainer(plan, Path(out), dist.DistEnv(), parts, report=lambda **kw: None)
    trainer.model.train()
    batches = length_grouped_batches(trainer.lengths, cfg.batch_size, trainer.generator)[: args.steps]
    layers = None
    if not args.eager_only:
        dynamic = {"true": True, "false": False, "none": None}[args.dynamic]
        layers = compile_regions(trainer.model, dynamic=dynamic)
    compiled_impl = [m._compiled_call_impl for m in layers] if layers else []

    def use(compiled: bool) -> None:
        for m, impl in zip(layers or [], compiled_impl):
            m._compiled_call_impl = impl if compiled else None

    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    cpu: dict[str, list[float]] = {"eager": [], "compiled": []}
    first_compiled = None
    for i, ids in enumerate(batches):
        order = ["eager", "compiled"] if i % 2 == 0 else ["compiled", "eager"]
        if args.eager_only:
            order = ["eager"]
        for kind in order:
            use(kind == "compiled")
            t0, c0 = time.perf_counter(), time.process_time()
            row = trainer.step(ids)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if kind == "compiled" and first_compiled is None:
                first_compiled = dt
            else:
                times[kind].append(dt)
                cpu[kind].append(dc)
            print(f"step {i} {kind:8s} {dt:7.3f} s (CPU {dc:7.3f} s)  tokens {row['tokens']}  loss {row['loss']:.4f}", flush=True)
    stats = dict(dutils.counters["stats"])
    print("machine load average:", os.getloadavg())
    print("dynamo stats:", stats, "recompiles:", dict(dutils.counters["recompiles"]) if "recompiles" in dutils.counters else {})
    eager = statistics.median(times["eager"])
    print(f"eager median step {eager:.3f} s (CPU {statistics.median(cpu['eager']):.3f} s) over {len(times['eager'])}")
    if times["compiled"]:
        comp = statistics.median(times["compiled"])
        print(f"compiled median step {comp:.3f} s (CPU {statistics.median(cpu['compiled']):.3f} s) over {len(times['compiled'])}  ratio {comp / eager:.3f}")
        print(f"first compiled step {first_compiled:.1f} s: compile ~{first_compiled - eager:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
