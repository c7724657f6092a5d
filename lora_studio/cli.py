"""Command line: `python -m lora_studio train|compare|evaluate|bakeoff|inspect|runs|export|push ...` (headless, same engine as the UI;
the benchmark is `python -m benchmarks`, outside the runtime package)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from lora_studio.cli_flags import _resume_config, build_parser, config_from_args
from lora_studio.config import TrainConfig
from lora_studio.redact import redact


def _gpu_count(spec: str) -> int:
    if spec == "auto":
        import torch

        return torch.cuda.device_count()  # reads NVML; does not initialize CUDA here
    try:
        return int(spec)
    except ValueError:
        raise SystemExit(f"--gpus {spec!r}: expected a number or auto") from None


def _relaunch_under_torchrun(n: int, argv: list[str]) -> None:
    """Replace this process by torchrun running the same command on n GPUs (same pid)."""
    rest = []
    skip = False
    for a in argv:  # drop --gpus: the ranks must not relaunch themselves
        if skip:
            skip = False
            continue
        if a == "--gpus":
            skip = True
            continue
        if a.startswith("--gpus="):
            continue
        rest.append(a)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    cmd = [*torchrun, "-m", "lora_studio", *rest]
    print("running on", n, "GPUs:", " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)


def progress_line(row: dict[str, Any], total: int | None) -> str:
    frac = row.get("progress", 0.0)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    line = (
        f"[{bar}] {row['step']:>5}/{total or '?'}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
        f"{row['tokens_per_s']:.0f} tok/s  rss {row['rss_mb']:.0f} MiB  eta {row['eta_s']:.0f}s"
    )
    if "eval_loss" in row:
        line += f"  eval {row['eval_loss']:.4f}"
    return line


def check_before_training(cfg: TrainConfig, world: int = 1) -> None:
    """The Train tab's pre-run checks (lora_studio.preflight), with the facts the Data tab would
    have found: usable rows and the longest row. Data with errors is left to the run, whose
    message names the file, row and field."""
    from lora_studio.data import inspect_data, parse_columns
    from lora_studio.models import load_tokenizer
    from lora_studio.preflight import data_facts, preflight

    cfg = cfg.resolved()
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    preview = inspect_data(cfg.data, tokenizer, fmt=cfg.format, columns=parse_columns(cfg.columns),
                           system_prompt=cfg.system_prompt, max_seq_len=cfg.max_seq_len)
    rows, max_tokens = data_facts(preview, cfg.max_seq_len) if preview.report.ok or cfg.drop_invalid else (None, None)
    preflight(cfg, rows=rows, max_tokens=max_tokens, world=world)


def cmd_train(args: argparse.Namespace) -> int:
    from lora_studio.engine.run import train
    from lora_studio.runfiles import FAILED, clear_control, read_status

    cfg = _resume_config(args) if args.resume else config_from_args(args)
    # A new run gets the Train tab's checks before a run folder exists; not a resume (it passed
    # them when it started), a runner-started worker (the tab ran them) or a torchrun rank.
    n_gpus = _gpu_count(args.gpus)
    if not (args.resume or os.environ.get("LORA_STUDIO_SUPERVISED") or "WORLD_SIZE" in os.environ):
        check_before_training(cfg, world=max(1, n_gpus))
    if n_gpus > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_under_torchrun(n_gpus, args.argv)
    if not os.environ.get("LORA_STUDIO_SUPERVISED"):
        # A stop request left from an earlier life of this folder. (A runner-started worker keeps
        # it: the runner cleared it at launch, so it is a stop pressed while the worker started.)
        clear_control(cfg.out)

    def progress(row: dict[str, Any]) -> None:
        print(progress_line(row, read_status(cfg.out).get("total_steps")), flush=True)

    status = train(cfg, on_step=progress, resume=bool(args.resume))
    if not status:  # a DDP rank other than 0
        return 0
    if status.get("state") == FAILED:
        print(f"training failed: {redact(status.get('error'))}", file=sys.stderr)
        return 1
    print(f"{status['state']}: {status.get('step')} steps; adapter in {Path(cfg.out) / 'adapter'}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from lora_studio.runner import Runner

    runs = Runner(args.runs_dir).list_runs()
    if not runs:
        print(f"no runs in {Runner(args.runs_dir).runs_dir}")
        return 0
    print(f"{'run':<36} {'state':<9} {'method':<11} {'step':>11} {'loss':>8}  note")
    for r in runs:
        step = f"{r.get('step') or 0}/{r.get('total_steps') or '?'}"
        loss = f"{r['loss']:.4f}" if isinstance(r.get("loss"), (int, float)) else "-"
        note = r.get("error") or (f"queue position {r['queue_position']}" if r.get("queue_position") else "")
        print(f"{r['run_id']:<36} {r.get('state', '?'):<9} {r.get('method') or '-':<11} {step:>11} {loss:>8}  {note}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lora_studio.compare import GenerationSettings, TunedModel, compare, read_prompts

    prompts = read_prompts(args.prompts)
    tuned = TunedModel(args.run)
    saved = tuned.generation  # what the run recorded; flags given override it
    settings = GenerationSettings(
        args.max_new_tokens if args.max_new_tokens is not None else saved.max_new_tokens,
        args.temperature if args.temperature is not None else saved.temperature,
        args.top_p if args.top_p is not None else saved.top_p,
        args.seed,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for i, row in enumerate(compare(tuned, prompts, settings), start=1):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            print(f"[{i}/{len(prompts)}] {row['prompt'][:60]!r}\n  base : {row['base'][:200]!r}\n  tuned: {row['tuned'][:200]!r}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lora_studio.evaluate import evaluate_run, reference_rows

    rows = reference_rows(args.data, args.format, args.columns)
    summary = evaluate_run(args.run, rows, args.out, args.max_new_tokens, batch_size=args.batch_size)
    for who in ("base", "tuned"):
        s = summary[who]
        print(f"{who:<5}  exact {s['exact_match']:.3f}  f1 {s['f1']:.3f}  rougeL {s['rougeL']:.3f}")
    print(f"{summary['n']} rows; replies in {summary['replies']}, summary in {args.out}")
    return 0


def cmd_bakeoff(args: argparse.Namespace) -> int:
    import time

    from lora_studio import bakeoff
    from lora_studio.runner import Runner

    cfg = config_from_args(args)  # the shared settings; each run gets its own folder under OUT/runs
    out = Path(args.out)
    runner = Runner(out / "runs")
    bakeoff.create(out, cfg, args.methods, test=args.test, max_new_tokens=args.max_new_tokens)
    seen: dict[str, str] = {}
    try:
        while True:
            state = bakeoff.advance(out, runner)
            for item in state["queue"]:
                if seen.get(item["method"]) != item["state"]:
                    seen[item["method"]] = item["state"]
                    print(f"{item['method']:<11} {item['state']:<9} {item['run']}", flush=True)
            if state["finished"]:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        for item in state["queue"]:
            if item["run"] and item["state"] in ("queued", "starting", "running"):
                runner.stop(item["run"], save=True)
        print("bake-off interrupted: the active run was asked to stop", file=sys.stderr)
        return 130
    print((out / "leaderboard.md").read_text(), end="")
    print(f"leaderboard in {out / 'leaderboard.csv'}, loss curves in {out / 'loss.png'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lora_studio.export import export_run

    def progress(fraction: float, what: str) -> None:
        print(f"[{fraction:4.0%}] {what}", flush=True)

    out = export_run(args.run, args.export_format, args.out, quant=args.quant, progress=progress)
    print(f"{args.export_format} written to {out}")
    if args.export_format == "gguf":
        print(f"Ollama: ollama create NAME -f {out.parent / 'Modelfile'}")
    if args.export_format == "gguf-lora":
        print(f"llama.cpp: llama-cli -m BASE.gguf --lora {out}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from lora_studio.export import push_to_hub

    if args.what == "merged" and not (Path(args.run) / "merged" / "config.json").exists():
        from lora_studio.export import save_merged

        print("saving the merged model first (RUN/merged)", flush=True)
        save_merged(args.run)
    # The operator's own command line: the token comes from HF_TOKEN, read inside push_to_hub.
    url = push_to_hub(args.run, args.repo, None, kind=args.what, private=not args.public)
    print(f"pushed the {args.what} to {url}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Exit status 0 when the data trains as it is, 1 when rows have errors."""
    from lora_studio.data import inspect_data
    from lora_studio.models import load_tokenizer

    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    preview = inspect_data(
        args.data,
        tokenizer,
        fmt=args.format,
        columns=args.columns,
        system_prompt=args.system_prompt,
        max_seq_len=args.max_seq_len,
        n_rows=args.rows,
        n_samples=args.samples,
    )
    if preview.rows is not None and args.rows:
        print(preview.rows.to_string(index=False, max_colwidth=60))
    print(preview.text())
    return 0 if preview.report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    commands = {"train": cmd_train, "compare": cmd_compare, "evaluate": cmd_evaluate, "bakeoff": cmd_bakeoff, "inspect": cmd_inspect, "runs": cmd_runs,
                "export": cmd_export, "push": cmd_push}  # fmt: skip
    if args.command not in commands:
        parser.error(f"unknown command {args.command}")
    return run_command(commands[args.command], args)


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`command(args)`, with any failure as one redacted `error:` line on stderr and exit code 2
    instead of a traceback (LORA_STUDIO_DEBUG=1 shows it). Shared by `python -m benchmarks`."""
    try:
        return command(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        if os.environ.get("LORA_STUDIO_DEBUG"):
            raise
        print(f"error: {redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)}", file=sys.stderr)
        return 2
    return 2
