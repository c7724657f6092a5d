"""The README that goes with every export of a run (adapter, merged model, GGUF, GGUF LoRA, Hub push),
generated from the run folder (config, status, metrics), so what it says about method, data, settings
and results is what the run did."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from lora_studio.adapters import read_adapter_record
from lora_studio.methods import REGISTRY
from lora_studio.runfiles import adapter_dir, read_metrics, read_status

CARD_SETTINGS = (
    "method", "rank", "alpha", "dropout", "lr", "lr_ratio", "use_rslora", "epochs", "max_steps", "batch_size",
    "max_seq_len", "target", "warmup_ratio", "weight_decay", "quantize", "seed",
)  # fmt: skip


def _config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    return dict(read_adapter_record(run_dir / "adapter").get("settings", {}))


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """Figures the card reports: steps, losses, speed and memory, from the run's own files."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    rows = read_metrics(run_dir)
    train = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    evals = [r for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    speeds = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    peak_keys = ("cuda_peak_mb", "peak_rss_mb")
    peak = {k: max(r[k] for r in rows if k in r) for k in peak_keys if any(k in r for r in rows)}
    return {
        "state": status.get("state"),
        "steps": status.get("step", len(rows)),
        "total_steps": status.get("total_steps"),
        "trainable_params": status.get("trainable_params"),
        "total_params": status.get("total_params"),
        "n_examples": status.get("n_examples"),
        "n_truncated": status.get("n_truncated"),
        "first_loss": train[0]["loss"] if train else None,
        "final_loss": train[-1]["loss"] if train else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "elapsed_s": rows[-1].get("elapsed_s") if rows else None,
        "median_tokens_per_s": statistics.median(speeds) if speeds else None,
        **peak,
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def model_card(run_dir: str | Path, kind: str = "adapter", repo_id: str | None = None) -> str:
    """README.md for the Hub: front matter, method, data, settings, metrics, how to load it."""
    run_dir = Path(run_dir)
    record = read_adapter_record(adapter_dir(run_dir))
    cfg = _config(run_dir)
    summary = run_summary(run_dir)
    method = REGISTRY.get(cfg.get("method", record.get("method", "")))
    base = record.get("settings", {}).get("model") or cfg.get("model", "bundled")
    from lora_studio.models import base_model_id

    base_id = base_model_id(base)
    is_hub_id = not Path(base_id).exists() and base_id.count("/") == 1
    front = ["---"]
    if is_hub_id:
        front.append(f"base_model: {base_id}")
    front += [
        f"library_name: {'peft' if kind == 'adapter' else 'transformers'}",
        "pipeline_tag: text-generation",
        "tags:",
        "- lora-studio",
        f"- {cfg.get('method', 'lora')}",
        "---",
    ]
    name = repo_id or run_dir.name
    title = method.title if method else cfg.get("method", "?")
    lines = [
        *front,
        f"# {name}",
        "",
        f"{'A' if kind == 'adapter' else 'A merged model from a'} **{title}** adapter for `{base_id}`, "
        f"fine-tuned with LoRA Studio (run `{run_dir.name}`).",
    ]
    if method:
        lines += ["", f"{method.summary} ({method.paper})"]
    data = cfg.get("data") or ""
    lines += [
        "",
        "## Training data",
        "",
        f"- file: `{Path(data).name if data else '—'}`",
        f"- examples trained on: {_fmt(summary['n_examples'])} (truncated to max length: {_fmt(summary['n_truncated'])})",
        f"- system prompt: {_fmt(cfg.get('system_prompt'))}",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(cfg.get(k))} |" for k in CARD_SETTINGS if k in cfg],
    ]
    options = cfg.get("method_options") or {}
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(options.items())]
    lines += [
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        f"| state | {_fmt(summary['state'])} |",
        f"| steps | {_fmt(summary['steps'])} of {_fmt(summary['total_steps'])} |",
        f"| trainable parameters | {_fmt(summary['trainable_params'])} of {_fmt(summary['total_params'])} |",
        f"| first / final train loss | {_fmt(summary['first_loss'])} / {_fmt(summary['final_loss'])} |",
        f"| final eval loss | {_fmt(summary['final_eval_loss'])} |",
        f"| training time (s) | {_fmt(summary['elapsed_s'])} |",
        f"| median tokens/s | {_fmt(summary['median_tokens_per_s'])} |",
    ]
    for key, label in (("cuda_peak_mb", "peak GPU memory (MiB)"), ("peak_rss_mb", "peak process memory (MiB)")):
        if key in summary:
            lines.append(f"| {label} | {_fmt(summary[key])} |")
    load_name = repo_id or "PATH_TO_THIS_FOLDER"
    lines += ["", "## Use", "", "```python"]
    if kind == "adapter":
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
            f'model = PeftModel.from_pretrained(base, "{load_name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{base_id}")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{load_name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{load_name}")',
        ]
    lines += [
        "```",
        "",
        "Prompt it through the chat template it was trained with (kept in `lora_studio.json`"
        + (" and the tokenizer" if kind == "merged" else "")
        + "), or replies may not stop at EOS.",
        "",
    ]
    return "\n".join(lines)


def gguf_readme(run_dir: Path, path: Path, quant: str, base_id: str) -> str:
    name = run_dir.name.lower()
    return "\n".join([
        f"# {run_dir.name} (GGUF, {quant})",
        "",
        f"`{path.name}`: the **{base_id}** base with the run's adapter merged in, written by LoRA Studio",
        "with the gguf package's writer. It carries the tokenizer and the chat template the run trained with",
        "(`tokenizer.chat_template`).",
        "",
        "## llama.cpp",
        "",
        "```sh",
        f"llama-cli -m {path.name} -cnv",
        f"llama-server -m {path.name}",
        "```",
        "",
        "## Ollama",
        "",
        "The `Modelfile` beside this file points at it and sets the prompt template, the stop tokens and",
        "the run's generation settings:",
        "",
        "```sh",
        f"ollama create {name} -f Modelfile",
        f"ollama run {name}",
        "```",
        "",
        "## LM Studio",
        "",
        "Put the .gguf file in a folder under LM Studio's models folder (`lms import` does it).",
        "",
        "## transformers",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("PATH_TO_THIS_FOLDER", gguf_file="{path.name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("PATH_TO_THIS_FOLDER", gguf_file="{path.name}")',
        "```",
        "",
    ])


def gguf_lora_readme(run_dir: Path, path: Path, base_id: str) -> str:
    name = run_dir.name.lower()
    return "\n".join([
        f"# {run_dir.name} (GGUF LoRA adapter)",
        "",
        f"`{path.name}`: the run's adapter in llama.cpp's LoRA adapter format, for the **{base_id}** base.",
        "It holds only the low-rank matrices: apply it to a GGUF of that same base model (one converted",
        "with llama.cpp's `convert_hf_to_gguf.py`, any quantization, or LoRA Studio's own unmerged export).",
        "Its tensor names and shapes follow llama.cpp's `convert_lora_to_gguf.py`; LoRA Studio checks the file",
        "against that format and against its own merged model, but it was not run in a llama.cpp binary here.",
        "",
        "## llama.cpp",
        "",
        "```sh",
        f"llama-cli -m BASE.gguf --lora {path.name} -cnv",
        f"llama-server -m BASE.gguf --lora {path.name}",
        "```",
        "",
        "## Ollama",
        "",
        "A Modelfile beside the two files:",
        "",
        "```",
        "FROM ./BASE.gguf",
        f"ADAPTER ./{path.name}",
        "```",
        "",
        "```sh",
        f"ollama create {name} -f Modelfile",
        "```",
        "",
        "A single file with the adapter merged in: `python -m lora_studio export --format gguf`.",
        "",
    ])
