"""How much compute padding wastes, per batching strategy, on a dataset: random batches,
length-grouped batches (the default) and packing. Prints one table; with --time, also the
forward+backward seconds for one epoch through the model.

    python scripts/bench_batching.py --data examples/chat_messages.jsonl --model bundled --time
"""

from __future__ import annotations

import argparse
import time

import torch

from lora_studio.config import TrainConfig
from lora_studio.data import build_datasets, check_packing, collate, length_grouped_batches, pack_examples, parse_columns
from lora_studio.methods import get_method, inject_adapters
from lora_studio.models import load_model, load_tokenizer
from lora_studio.engine.loss import causal_lm_loss


def batches_of(strategy: str, examples, batch_size: int, max_len: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if strategy == "random":
        order = torch.randperm(len(examples), generator=gen).tolist()
        return [[examples[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]
    if strategy == "packed":
        examples = pack_examples(examples, max_len)
    lengths = [len(e.input_ids) for e in examples]
    return [[examples[i] for i in b] for b in length_grouped_batches(lengths, batch_size, gen)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="examples/json_answers.jsonl")
    p.add_argument("--columns", default="")
    p.add_argument("--model", default="bundled")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--time", action="store_true", help="also time forward+backward over one epoch")
    args = p.parse_args()
    tokenizer = load_tokenizer(args.model)
    cfg = TrainConfig(
        data=args.data, model=args.model, columns=parse_columns(args.columns), max_seq_len=args.max_seq_len, rank=16
    ).resolved()
    examples, _, _ = build_datasets(cfg, tokenizer)
    real = sum(len(e.input_ids) for e in examples)
    model = None
    if args.time:  # a frozen base with LoRA on every linear layer, as in training
        model = load_model(args.model)
        check_packing(model)
        inject_adapters(model, get_method("lora"), cfg)
        model.train()
    print(f"{args.data}: {len(examples)} rows, {real} tokens, batch size {args.batch_size}, max_seq_len {args.max_seq_len}")
    print(f"{'strategy':<14}{'steps':>7}{'tensor tokens':>15}{'padding':>9}" + (f"{'fwd+bwd s':>11}{'real tok/s':>12}" if model else ""))
    for strategy in ("random", "length-grouped", "packed"):
        batches = batches_of(strategy, examples, args.batch_size, args.max_seq_len, seed=0)
        tensor_tokens = sum(len(b) * max(len(e.input_ids) for e in b) for b in batches)
        line = f"{strategy:<14}{len(batches):>7}{tensor_tokens:>15}{100 * (1 - real / tensor_tokens):>8.1f}%"
        if model is not None:
            start = time.perf_counter()
            for b in batches:
                loss, n = causal_lm_loss(model, collate(b, tokenizer.pad_token_id))
                (loss / max(1, n)).backward()
                model.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            line += f"{elapsed:>11.1f}{real / elapsed:>12.0f}"
        print(line)


if __name__ == "__main__":
    main()
