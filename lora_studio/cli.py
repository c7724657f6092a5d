"""Command line: `python -m lora_studio train|compare|evaluate|bakeoff|inspect|runs|export|push ...` (headless, same engine as the UI;
the benchmark is `python -m benchmarks`, outside the runtime package)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from lora_studio.config import TrainConfig
from lora_studio.data.formats import FORMATS
from lora_studio.methods import REGISTRY
from lora_studio.redact import redact


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a model on an instruction file")
    p.add_argument("--out", help="run folder to write")
    p.add_argument("--method", choices=list(REGISTRY), help="fine-tuning method (default lora)")
    _train_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or crashed run from its last checkpoint")
    p.add_argument(
        "--gpus", default="1", help="GPUs to train on: a number or auto (all visible); more than 1 runs under torchrun"
    )


def _bakeoff_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bakeoff", help="train several methods on the same data and budget, score and rank them")
    p.add_argument("--methods", required=True, help=f"comma-separated, from {','.join(REGISTRY)}")
    p.add_argument("--out", required=True, help="bake-off folder: runs/, scores/, leaderboard.csv/.md, loss.png")
    p.add_argument("--test", help="rows with a prompt and a reference to score on (default: the held-out split)")
    p.add_argument("--max-new-tokens", type=int, default=64, dest="max_new_tokens", help="reply length when scoring")
    _train_flags(p)


def _train_flags(p: argparse.ArgumentParser) -> None:
    """The training settings `train` and `bakeoff` share (the bake-off gives every method the same)."""
    p.add_argument("--config", help="a config.json from an earlier run (flags given override it)")
    p.add_argument("--data", help="training data: JSONL/JSON/CSV/TSV/Parquet file or Hub owner/name[:config][@split]")
    p.add_argument("--model", help="bundled, a Hub id, or a local folder (default bundled)")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-ratio", type=float, dest="lr_ratio", help="eta_B / eta_A (LoRA+)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int, dest="max_steps")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--max-seq-len", type=int, dest="max_seq_len")
    p.add_argument("--target", help="all-linear or comma-separated module names")
    p.add_argument("--seed", type=int)
    p.add_argument("--warmup-ratio", type=float, dest="warmup_ratio")
    p.add_argument("--weight-decay", type=float, dest="weight_decay")
    p.add_argument("--system-prompt", dest="system_prompt")
    _data_format_args(p)
    p.add_argument("--val-data", dest="val_data", help="a second file held out for the eval loss")
    p.add_argument("--val-fraction", type=float, dest="val_fraction", help="fraction of rows held out for the eval loss")
    p.add_argument("--packing", action="store_true", default=None, help="pack samples into full rows (no cross-attention)")
    p.add_argument(
        "--drop-invalid", action="store_true", default=None, dest="drop_invalid", help="drop bad rows instead of refusing"
    )
    p.add_argument("--rslora", action="store_true", default=None, dest="use_rslora")
    p.add_argument("--quantize", choices=["4bit"])
    p.add_argument("--merge", action="store_true", default=None, help="also save a merged model")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        dest="trust_remote_code",
        help="run model code from the Hub repo (only for repos you trust)",
    )
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    p.add_argument(
        "--checkpoint-every", type=int, dest="checkpoint_every", help="resumable checkpoint every N steps (0: on stop only)"
    )
    p.add_argument("--eval-every", type=int, dest="eval_every", help="validation loss every N steps (0: at the end)")
    p.add_argument("--grad-accum-steps", type=int, dest="grad_accum_steps", help="micro-batches per optimizer step")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, dest="gradient_checkpointing")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile each decoder layer (one compile for all layers; kernels cached on disk)")
    p.add_argument("--probe", action="append", default=[], metavar="TEXT", help="a prompt answered at each evaluation (repeatable)")
    p.add_argument("--probes", dest="probes_file", metavar="FILE", help="probe prompts: JSONL with a prompt field, or one per line")
    p.add_argument("--probe-max-new-tokens", type=int, dest="probe_max_new_tokens")
    p.add_argument(
        "--early-stop", type=int, dest="early_stop", metavar="PATIENCE",
        help="stop after PATIENCE evaluations without a better eval loss (or test ROUGE-L with --test-data); keeps the best",
    )  # fmt: skip
    p.add_argument("--test-data", dest="test_data", help="prompts with references: early stopping watches their ROUGE-L")
    p.add_argument(
        "--report-to", choices=["trackio", "tensorboard", "wandb"], dest="report_to",
        help="also send the metrics to this tracker (its pip package must be installed; default: none)",
    )  # fmt: skip
    p.add_argument(
        "--strategy", choices=["auto", "ddp", "fsdp"],
        help="with several processes: ddp (whole model on each), fsdp (FSDP2: weights, gradients and optimizer "
        "sharded, 1/N on each), auto (default: fsdp only when the memory estimate exceeds one device). "
        "See docs/distributed.md",
    )  # fmt: skip


def _runs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list the runs in a runs folder: state, method, step, loss")
    p.add_argument("--runs-dir", dest="runs_dir", help="default: $LORA_STUDIO_RUNS_DIR or ./runs")


def _columns(text: str) -> dict[str, str]:
    from lora_studio.data import DataError, parse_columns

    try:
        return parse_columns(text)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _data_format_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        choices=list(FORMATS),
        help="row format (default: detected from the columns)",
    )
    p.add_argument(
        "--columns", type=_columns, metavar="FIELD=COLUMN,...", help="map your columns, e.g. instruction=question,output=answer"
    )


def _inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="validate a data file and show what the model would be trained on")
    p.add_argument("--data", required=True, help="JSONL/JSON/CSV/TSV/Parquet file or Hub owner/name[:config][@split]")
    p.add_argument("--model", default="bundled", help="whose tokenizer and chat template to render with (default bundled)")
    _data_format_args(p)
    p.add_argument("--system-prompt", dest="system_prompt")
    p.add_argument("--max-seq-len", type=int, default=512, dest="max_seq_len")
    p.add_argument("--samples", type=int, default=3, help="rendered samples to print")
    p.add_argument("--rows", type=int, default=5, help="first rows to print as a table")
    p.add_argument("--trust-remote-code", action="store_true", dest="trust_remote_code")


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="answer prompts with the base and the tuned model")
    p.add_argument("--run", required=True, help="run folder (or adapter folder)")
    p.add_argument("--prompts", required=True, help="JSONL with a prompt field, or one prompt per line")
    p.add_argument("--out", required=True, help="JSONL to write: prompt, base, tuned")
    p.add_argument("--max-new-tokens", type=int, dest="max_new_tokens", help="default: the run's saved setting (128)")
    p.add_argument("--temperature", type=float, help="0 = greedy; default: the run's saved setting (greedy)")
    p.add_argument("--top-p", type=float, dest="top_p", help="default: the run's saved setting (1.0)")
    p.add_argument("--seed", type=int, default=0)


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score the base and the tuned model's greedy replies against references")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--data", required=True, help="rows with a prompt and a reference reply, in any training format")
    p.add_argument("--out", required=True, help="summary JSON to write; the per-row replies go beside it (.jsonl)")
    p.add_argument("--max-new-tokens", type=int, dest="max_new_tokens", help="default: the run's saved setting")
    p.add_argument("--batch-size", type=int, default=8, dest="batch_size", help="prompts generated at once (default 8)")
    _data_format_args(p)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run: the adapter, the merged model, or a GGUF file (llama.cpp, Ollama)")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument(
        "--format", required=True, choices=["adapter", "merged", "gguf", "gguf-lora"], dest="export_format",
        help="gguf: the merged model; gguf-lora: the adapter alone, applied by llama.cpp/Ollama to the base's GGUF "
        "(plain LoRA runs: LoRA, Delta-LoRA, LoRA+, LoRA-FA, LoRA-Pro)",
    )  # fmt: skip
    p.add_argument(
        "--out", required=True,
        help="adapter: a folder, or a .zip; merged: a folder; gguf, gguf-lora: a folder (README beside the file) or a .gguf path",
    )  # fmt: skip
    p.add_argument("--quant", choices=["f16", "bf16", "q8_0"], default="f16", help="GGUF tensor type (default f16)")


def _push_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="push a run's adapter or merged model to the Hugging Face Hub (token: HF_TOKEN)")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--repo", required=True, help="Hub repository, user/name")
    p.add_argument("--what", choices=["adapter", "merged"], default="adapter", help="default adapter")
    p.add_argument("--public", action="store_true", help="create the repository public (default private)")


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    try:
        base = TrainConfig.load(args.config).to_dict() if args.config else {}
    except (ValueError, TypeError) as e:  # binary junk, not JSON, not an object
        raise ValueError(f"--config {args.config}: not a LoRA Studio config.json ({e})") from None
    names = set(TrainConfig.__dataclass_fields__) - {"method_options", "probes"}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            base[name] = value
    options = dict(base.get("method_options") or {})
    options.update(_parse_option(o) for o in args.option)
    base["method_options"] = options
    probes = list(getattr(args, "probe", None) or [])
    if getattr(args, "probes_file", None):
        from lora_studio.compare import read_prompts

        probes += read_prompts(args.probes_file)
    if probes:
        base["probes"] = probes
    cfg = TrainConfig.from_dict(base)
    if not cfg.data or not cfg.out:
        raise SystemExit("train needs --data and --out (or a --config that has them)")
    return cfg


def _resume_config(args: argparse.Namespace) -> TrainConfig:
    """The run's own config: a resume continues exactly the run that was started."""
    given = [n for n in TrainConfig.__dataclass_fields__ if getattr(args, n, None) not in (None, [])]
    if args.config or given or args.option or args.probe or args.probes_file:
        raise SystemExit("--resume continues a run as it was configured; drop the other training flags")
    run_dir = Path(args.resume)
    if not (run_dir / "config.json").exists():
        raise SystemExit(f"--resume {run_dir}: not a run folder (no config.json)")
    cfg = TrainConfig.load(run_dir / "config.json")
    cfg.out = str(run_dir)
    return cfg


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
    from lora_studio.runfiles import clear_control, read_status
    from lora_studio.engine.run import train

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
    if status.get("state") == "failed":
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
    parser = argparse.ArgumentParser(prog="python -m lora_studio", description="LoRA Studio, headless")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _compare_parser(sub)
    _evaluate_parser(sub)
    _bakeoff_parser(sub)
    _inspect_parser(sub)
    _runs_parser(sub)
    _export_parser(sub)
    _push_parser(sub)
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
