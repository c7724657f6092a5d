"""How many floating-point operations a training step needs, ours against the peft baseline.

    python scripts/bench_flops.py [--model bundled] [--data examples/json_answers.jsonl] [--steps 10]

Counts the matrix products (forward and backward, as `torch.utils.flop_counter` counts them) of
one optimizer step of our engine (`train.causal_lm_loss`: prefix-tree packing, LM head on trained
positions) and of the bench's baseline (transformers + peft LoRA, padded batch, `model(**batch).loss`),
on the same batches, and times both steps on one thread (CPU seconds). The FLOP ratio is what
the engine saves in work; the time ratio can only go below it by running the products faster
(bf16 units, fewer but larger products), so it is the floor for the speed-up at equal precision.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_studio.config import TrainConfig  # noqa: E402
from lora_studio.data import collate, length_grouped_batches  # noqa: E402
from lora_studio.engine.loop import prepare  # noqa: E402
from lora_studio.engine.loss import causal_lm_loss  # noqa: E402
from lora_studio.engine.plan import make_plan  # noqa: E402


def step_cost(loss_fn, params: list[torch.Tensor]) -> tuple[int, float]:
    """(matrix-product FLOPs, CPU seconds) of one forward + backward."""
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(loss_fn(), params)
    t0 = time.process_time()
    torch.autograd.grad(loss_fn(), params)
    return counter.get_total_flops(), time.process_time() - t0


def main(argv: list[str] | None = None) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_studio.models import resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--data", default="examples/json_answers.jsonl")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(dict(
        data=args.data, out="/tmp/lora_studio_flops", model=args.model, rank=args.rank,
        batch_size=args.batch_size, dropout=0.0, target="all-linear", precision="fp32",
    )).resolved()
    parts = prepare(make_plan(cfg))
    ours, examples, pad = parts["model"], parts["examples"], parts["tokenizer"].pad_token_id
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model), dtype=torch.float32)
    base = get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    base.train()
    base_params = [p for p in base.parameters() if p.requires_grad]
    order = length_grouped_batches([len(e.input_ids) for e in examples], cfg.batch_size,
                                   torch.Generator().manual_seed(cfg.seed))[: args.steps]
    with torch.no_grad():  # the one-time packing probe (a padded and a packed call) stays out of the counts
        causal_lm_loss(ours, collate([examples[i] for i in order[0]], pad))
    rows = []
    for ids in order:
        batch = collate([examples[i] for i in ids], pad)
        f_ours, t_ours = step_cost(lambda: causal_lm_loss(ours, batch)[0], ours_params)
        f_base, t_base = step_cost(lambda: base(**batch).loss, base_params)
        rows.append((int(batch["attention_mask"].sum()), f_ours, f_base, t_ours, t_base))
    print(f"{args.model}, {args.data}, batch {cfg.batch_size}, rank {cfg.rank}, all linear layers, "
          f"fp32, 1 thread; {len(rows)} steps of the bench's batch order\n")
    print("| step | real tokens | ours GFLOP | peft GFLOP | FLOP ratio | ours CPU s | peft CPU s | time ratio | ours GFLOP/s | peft GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, (tok, fo, fb, to, tb) in enumerate(rows, 1):
        print(f"| {k} | {tok} | {fo / 1e9:.1f} | {fb / 1e9:.1f} | {fo / fb:.3f} | {to:.2f} | {tb:.2f} | "
              f"{to / tb:.3f} | {fo / to / 1e9:.0f} | {fb / tb / 1e9:.0f} |")
    fo, fb = sum(r[1] for r in rows), sum(r[2] for r in rows)
    to, tb = sum(r[3] for r in rows), sum(r[4] for r in rows)
    print(f"| all | {sum(r[0] for r in rows)} | {fo / 1e9:.1f} | {fb / 1e9:.1f} | **{fo / fb:.3f}** | {to:.2f} | "
          f"{tb:.2f} | **{to / tb:.3f}** | {fo / to / 1e9:.0f} | {fb / tb / 1e9:.0f} |")


if __name__ == "__main__":
    main()
