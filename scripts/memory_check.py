"""Check the memory estimate (lora_studio/engine/memory.py) against measurements; prints markdown tables.

    .venv/bin/python scripts/memory_check.py            # tiny models + the bundled model, CPU
    .venv/bin/python scripts/memory_check.py --quick    # fewer configurations

Table 1: activations autograd saves for backward (saved-tensor hooks, exact) vs the formula.
Table 2: peak process RSS (CPU) or torch.cuda.max_memory_allocated (GPU) of real training
runs, each in a fresh process (`python -m lora_studio train`, 8 steps), vs `total_mb`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def saved_table(models: dict[str, str]) -> list[str]:
    import torch

    from lora_studio.config import TrainConfig
    from lora_studio.engine.memory import MB, estimate
    from lora_studio.engine.plan import make_plan
    from lora_studio.methods import get_method, inject_adapters
    from lora_studio.models import load_model
    from lora_studio.engine.loss import causal_lm_loss

    lines = ["| model | batch × length | measured saved MiB | estimated MiB | error |", "|---|---|---|---|---|"]
    for name, spec in models.items():
        for batch, length in ((1, 64), (4, 128)):
            cfg = TrainConfig(data="x", out="x", model=spec, batch_size=batch).resolved()
            model = load_model(spec)
            torch.manual_seed(0)
            inject_adapters(model, get_method("lora"), cfg)
            model.train()
            ids = torch.randint(3, model.config.vocab_size, (batch, length))
            labels = ids.clone()
            labels[:, : length // 2] = -100
            b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            seen: dict[int, int] = {}

            def pack(t):
                if t.untyped_storage().data_ptr() not in params:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                causal_lm_loss(model, b)
            trained = int((labels[:, 1:] != -100).sum())
            measured = (sum(seen.values()) - trained * model.config.vocab_size * 4) / MB
            est = estimate(make_plan(cfg, "cpu"), seq_len=length, trained_tokens=trained, model=model)
            predicted = est.activations_mb - (batch * length * length / MB if batch > 1 else 0)  # no padding mask here
            lines.append(f"| {name} | {batch} × {length} | {measured:.1f} | {predicted:.1f} | {100 * (predicted / measured - 1):+.1f}% |")
    return lines


def long_rows(path: Path, n: int = 64) -> Path:
    """Rows with ~200-token answers, so activations matter next to the weights."""
    words = "the quick brown fox jumps over the lazy dog while the river runs to the sea".split()
    with path.open("w") as fh:
        for i in range(n):
            answer = " ".join(words[(i + k) % len(words)] for k in range(150 + i % 40))
            fh.write(json.dumps({"instruction": f"Write a long sentence number {i}.", "output": answer}) + "\n")
    return path


def run_table(configs: list[tuple[str, str, str, list[str]]], device: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    what = "peak RSS MiB" if device == "cpu" else "CUDA peak MiB"
    lines = [f"| model | data | settings | measured {what} | estimated MiB | error |", "|---|---|---|---|---|---|"]
    for model, data_name, data, flags in configs:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "lora_studio", "train", "--model", model, "--data", data, "--out", tmp,
                   "--max-steps", "8", "--checkpoint-every", "0", *flags]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            status = json.loads((Path(tmp) / "status.json").read_text())
            if status.get("state") != "done":
                lines.append(f"| {model} | {data_name} | {' '.join(flags)} | failed: {status.get('error') or out.stderr[-200:]} | | |")
                continue
            rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
            key = "peak_rss_mb" if device == "cpu" else "cuda_peak_mb"
            measured = max(r[key] for r in rows)
            est = status["memory_estimate"]["total_mb"]
        lines.append(
            f"| {Path(model).name} | {data_name} | {' '.join(flags)} | {measured:.0f} | {est:.0f} | {100 * (est / measured - 1):+.1f}% |"
        )
        print(lines[-1], flush=True)
    return lines


def random_smol(path: Path, tok) -> str:
    """A randomly initialized model of SmolLM2-135M's shape, for machines without the bundled one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-saved", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="GPU set: a random SmolLM2-shaped model, bf16 and fp32")
    parser.add_argument("--select", help="run only the training configurations whose flags contain this text")
    args = parser.parse_args()
    import torch

    from tests.conftest import build_tokenizer, tiny_gpt2, tiny_llama

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="memcheck-"))
    tok = build_tokenizer()
    tiny = {}
    for name, build in (("tiny-llama", tiny_llama), ("tiny-gpt2", tiny_gpt2)):
        build(len(tok)).save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
        tiny[name] = str(tmp / name)
    if args.gpu:
        smol = random_smol(tmp / "random-smol", tok)
        long = str(long_rows(tmp / "long.jsonl"))
        configs = [(tiny["tiny-llama"], "long", long, ["--batch-size", "8", "--precision", p]) for p in ("fp32", "bf16")]
        for flags in (["--batch-size", "4"], ["--batch-size", "16"], ["--batch-size", "16", "--gradient-checkpointing"]):
            for precision in ("fp32", "bf16"):
                configs.append((smol, "long", long, [*flags, "--max-seq-len", "256", "--precision", precision]))
        print("\n".join(run_table(configs, device)))
        return
    if not args.skip_saved:
        print("\n".join(saved_table({**tiny, "SmolLM2-135M": "bundled"})), flush=True)
    examples = str(ROOT / "examples" / "json_answers.jsonl")
    long = str(long_rows(tmp / "long.jsonl"))
    configs = [
        (tiny["tiny-llama"], "examples", examples, ["--batch-size", "8"]),
        ("bundled", "examples", examples, ["--batch-size", "1"]),
        ("bundled", "examples", examples, ["--batch-size", "8"]),
        ("bundled", "long", long, ["--batch-size", "4", "--max-seq-len", "256"]),
        ("bundled", "long", long, ["--batch-size", "4", "--max-seq-len", "256", "--gradient-checkpointing"]),
    ]
    if not args.quick:
        configs += [
            ("bundled", "examples", examples, ["--batch-size", "16"]),
            ("bundled", "long", long, ["--batch-size", "8", "--max-seq-len", "256"]),
            ("bundled", "long", long, ["--batch-size", "8", "--max-seq-len", "256", "--grad-accum-steps", "2"]),
            ("bundled", "long", long, ["--batch-size", "8", "--max-seq-len", "256", "--gradient-checkpointing"]),
        ]
    if args.select:
        configs = [c for c in configs if args.select in " ".join(c[3])]
    print("\n".join(run_table(configs, device)))


if __name__ == "__main__":
    main()
