"""The bench's driver: the command line, the rows every run reads, and the worker processes,
loaded side by side and training in turns (see variants.Turns)."""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.report import check_targets, markdown, methods_markdown, ratios
from benchmarks.variants import (
    BASELINES,
    DEFAULT_VARIANTS,
    PEFT_MISSING,
    PEFT_VARIANTS,
    VARIANTS,
    load_average,
    machine_info,
)
from lora_studio.plot import loss_png, loss_svg

# ---------------------------------------------------------------- the driver


def split_rows(data: str, eval_data: str | None, eval_fraction: float, seed: int, out: Path) -> tuple[str, str, int, int]:
    """Write the train and held-out files every run reads (the same rows for all), as JSONL
    whatever the source's kind (the columns, and so the detected format, are kept)."""
    from lora_studio.data import DataError, held_out_ids, read_source

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
        if eval_fraction <= 0:  # the bench scores held-out rows: it needs some
            raise ValueError("--eval-fraction must be above 0 (or pass --eval-data)")
        held_ids = held_out_ids(len(rows), eval_fraction, seed)
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
            [sys.executable, "-m", "benchmarks", "--worker", str(out / "spec.json")],
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
    if any(v in PEFT_VARIANTS for v in variants):
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
    if "ours-qlora" in ok and "peft-qlora" in ok:  # each over its own 4-bit base
        report.setdefault("ratios", {})["ours-qlora / peft-qlora"] = ratios(ok["ours-qlora"], ok["peft-qlora"])
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
    from lora_studio.runfiles import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{stem}.json", report)
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}_loss.svg").write_text(loss_svg(report["results"], title))
    wrote = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}_loss.svg"]
    if loss_png(report["results"], title, out / f"{stem}_loss.png"):
        wrote.append(out / f"{stem}_loss.png")
    print(table)
    print("wrote " + ", ".join(str(p) for p in wrote))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="time our engine against transformers + peft on the same job")
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
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    report = bench_methods(args) if args.methods else bench(args)
    failed = [k for k, v in report["results"].items() if "error" in v]
    return 1 if failed and len(failed) == len(report["results"]) else 0


def main(argv: list[str] | None = None) -> int:
    """Run the bench; bad input is one `error:` line and exit code 2, as in `python -m lora_studio`."""
    from lora_studio.cli import run_command

    return run_command(cmd_bench, build_parser().parse_args(sys.argv[1:] if argv is None else argv))
