"""The fastest an fp32 LoRA step of the bench's job could be here: its matrix products alone.

    python -m benchmarks.layer_bound [--bench-json runs/bench/bench.json] [--threads 1 2]

Times one decoder layer's seven linear products with their LoRA terms (forward, then backward to
the input and the adapter weights, as a training step needs them) at the number of positions one
packed step of the bench holds, and the tied LM head on the trained positions, each alone with
nothing else around it. Sum over the layers = the time a step's products take when they run at
the best rate these shapes reach on this CPU, with attention, norms, activations, the optimizer
and Python costing nothing. Given a bench.json, the table divides that by the baseline's measured
step time (peft-fp32): no fp32 engine that does the job's arithmetic can beat that ratio here.
Also times q/k/v and gate/up fused into one product each (one larger product instead of three
or two), to show whether fusing would raise the rate.

Defaults are SmolLM2-135M (the bundled model) and the bench's epoch of examples/json_answers.jsonl:
4,835 packed positions and 1,719 trained positions in 28 steps (`speed.py`'s prefix-tree packing).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):  # warm-up: allocator and oneDNN primitive caches
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def layer_step(m: int, d: int, kv: int, ff: int, r: int, fused: bool):
    """A callable: forward + backward of one layer's adapted linears on m positions."""
    torch.manual_seed(0)
    shapes = {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d), "g": (ff, d), "u": (ff, d), "d": (d, ff)}
    w = {n: torch.randn(o, i) * 0.02 for n, (o, i) in shapes.items()}  # frozen
    a = {n: (torch.randn(r, i) * 0.02).requires_grad_() for n, (o, i) in shapes.items()}  # (r, d_in)
    b = {n: (torch.randn(o, r) * 0.02).requires_grad_() for n, (o, i) in shapes.items()}  # (d_out, r)
    w_qkv, w_gu = torch.cat([w["q"], w["k"], w["v"]]), torch.cat([w["g"], w["u"]])
    x = torch.randn(m, d, requires_grad=True)

    def lin(h: torch.Tensor, n: str) -> torch.Tensor:
        return F.linear(h, w[n]) + F.linear(F.linear(h, a[n]), b[n]) * 2.0

    def lin_group(h: torch.Tensor, names: list[str], w_cat: torch.Tensor) -> list[torch.Tensor]:
        z = F.linear(h, torch.cat([a[n] for n in names])).split(r, -1)  # (m, r) each
        ys = F.linear(h, w_cat).split([w[n].shape[0] for n in names], -1)
        return [y + F.linear(zn, b[n]) * 2.0 for y, zn, n in zip(ys, z, names)]

    def step() -> None:
        q, k, v = lin_group(x, ["q", "k", "v"], w_qkv) if fused else (lin(x, "q"), lin(x, "k"), lin(x, "v"))
        h = lin(q + torch.cat([k, v, k], -1), "o")  # stands in for attention: same shapes, no cost
        g, u = lin_group(h, ["g", "u"], w_gu) if fused else (lin(h, "g"), lin(h, "u"))
        lin(F.silu(g) * u, "d").sum().backward()

    flops = 2 * m * sum(o * i for o, i in shapes.values()) * 2  # forward + input gradient
    flops += 2 * m * r * sum(o + i for o, i in shapes.values()) * 3  # adapter: forward, input and weight grads
    return step, flops


def head_step(t: int, d: int, vocab: int):
    """Forward + backward-to-input of the (frozen, tied) LM head on t trained positions."""
    e = torch.randn(vocab, d) * 0.02
    h = torch.randn(t, d, requires_grad=True)

    def step() -> None:
        F.linear(h, e).sum().backward()

    return step, 4 * t * d * vocab


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench-json", help="a bench.json: the bound is put against its peft-fp32 step time")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--positions", type=float, default=4835 / 28, help="packed positions per step")
    p.add_argument("--trained", type=float, default=1719 / 28, help="trained (reply) positions per step")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--kv", type=int, default=192, help="k and v projection width (GQA)")
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=25)
    args = p.parse_args(argv)

    peft_step_s = None
    if args.bench_json:
        with open(args.bench_json) as fh:
            base = json.load(fh)["results"]["peft-fp32"]
        peft_step_s = base["train_s"] / base["steps"]
    m, t = round(args.positions), round(args.trained)
    print(f"{args.layers} layers, hidden {args.hidden}, kv {args.kv}, ffn {args.ffn}, vocab {args.vocab}, rank {args.rank}; "
          f"{m} packed positions, {t} trained, per step; fp32, median of {args.repeats}\n")
    print("| threads | products | ms per layer | layer GFLOP/s | LM head ms | step's products (s) | / peft-fp32 step |")
    print("|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        head, head_flops = head_step(t, args.hidden, args.vocab)
        head_ms = _median_ms(head, args.repeats)
        for fused in (False, True):
            step, flops = layer_step(m, args.hidden, args.kv, args.ffn, args.rank, fused)
            ms = _median_ms(step, args.repeats)
            total_s = (ms * args.layers + head_ms) / 1e3
            ratio = f"{total_s / peft_step_s:.3f}" if peft_step_s else "-"
            print(f"| {threads} | {'q/k/v, gate/up fused' if fused else 'as the model has them'} | {ms:.2f} | "
                  f"{flops / ms / 1e6:.0f} | {head_ms:.1f} | {total_s:.3f} | {ratio} |")
    if peft_step_s:
        print(f"\npeft-fp32 step: {peft_step_s:.3f} s ({args.bench_json})")


if __name__ == "__main__":
    main()
