"""Per-step losses of fixed tiny runs through `python -m lora_studio train` (fp32, seed 0), one per
method plus accumulation / eval / dropout variants: run before and after an engine change and compare
the JSON files exactly (docs/architecture.md). Builds its own tiny random Llama and tokenizer; no download.

    python scripts/engine_losses.py OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLI_RUNS = {  # name: extra CLI flags (the CLI's files and flags must stay the same too)
    "lora": ["--method", "lora", "--dropout", "0.1", "--eval-every", "2", "--val-fraction", "0.2"],
    "lora-accum": ["--method", "lora", "--grad-accum-steps", "2"],
}
METHODS = ["dora", "vera", "delta-lora", "lora-fa", "lora-plus", "lora-pro"]  # the engine's train() in-process


def _train():
    try:
        from lora_studio.engine.run import train
    except ImportError:  # the tree before the engine package (the "before" of docs/architecture.md)
        from lora_studio.train import train
    return train


def main(out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from tests.conftest import build_tokenizer, format_rows, tiny_llama, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="engine-losses-"))
    tok = build_tokenizer()
    model_dir = work / "model"
    tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(work / "train.jsonl", format_rows(24))
    result = {}
    common = dict(data=str(data), model=str(model_dir), rank=4, batch_size=5, epochs=2, precision="fp32", seed=0, lr=0.01)
    for name, flags in CLI_RUNS.items():
        run = work / name
        cmd = [sys.executable, "-m", "lora_studio", "train", "--data", str(data), "--out", str(run),
               "--model", str(model_dir), "--rank", "4", "--batch-size", "5", "--epochs", "2",
               "--precision", "fp32", "--seed", "0", "--lr", "0.01", *flags]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        result[name] = {
            "loss": [r["loss"] for r in rows],
            "eval_loss": [r["eval_loss"] for r in rows if "eval_loss" in r],
            "files": sorted(p.name for p in run.iterdir()),
        }
        print(name, result[name]["loss"][-1], flush=True)
    from lora_studio.config import TrainConfig

    for name in METHODS:
        run = work / name
        status = _train()(TrainConfig(out=str(run), method=name, val_fraction=0.2, **common))
        assert status["state"] == "done", status
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        result[name] = {"loss": [r["loss"] for r in rows], "eval_loss": [r["eval_loss"] for r in rows if "eval_loss" in r],
                        "files": sorted(p.name for p in run.iterdir())}
        print(name, result[name]["loss"][-1], flush=True)
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
