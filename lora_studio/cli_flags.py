"""The command line's flags: one parser per `python -m lora_studio` command, the training flags
`train` and `bakeoff` share, and how they become a TrainConfig (`config_from_args`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lora_studio.config import TrainConfig
from lora_studio.data.formats import FORMATS
from lora_studio.methods import REGISTRY


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
    p.add_argument(
        "--compile", nargs="?", const=True, default=None, type=_compile_choice, metavar="auto|off",
        help="torch.compile each decoder layer (one compile for all layers; kernels cached on disk); "
        "default auto: only where the run is predicted to win back the compile time",
    )  # fmt: skip
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_studio", description="LoRA Studio, headless")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _compare_parser, _evaluate_parser, _bakeoff_parser, _inspect_parser, _runs_parser,
                _export_parser, _push_parser):  # fmt: skip
        add(sub)
    return parser


def _compile_choice(text: str) -> bool | str:
    """--compile (on), --compile auto, --compile off."""
    value = {"on": True, "true": True, "auto": "auto", "off": False, "false": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected on, auto or off (got {text!r})")
    return value
