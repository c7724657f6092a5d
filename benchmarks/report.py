"""The bench's numbers side by side: ratios of ours to each baseline, the issue's targets, and
the markdown tables (bench.md, methods.md)."""

from __future__ import annotations

import math
import statistics
from typing import Any

TARGETS = {  # issue 16's
    "time_vs_peft_fp32": 0.35,
    "time_vs_peft_bf16": 0.5,
    "memory_vs_peft_fp32": 0.75,
    "eval_loss_rel_diff": 0.02,
    "tokens_per_s": 1000.0,  # the moonshot: real (non-padding) tokens a second, ours
}


def ratios(ours: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    def r(key: str) -> float:
        return ours[key] / base[key] if base.get(key) else math.nan

    def step_times(result: dict[str, Any]) -> list[float]:
        ends = [t for t, _ in result["curve"]]
        return [b - a for a, b in zip([0.0, *ends], ends)]

    # Both runs take the same batches in the same order (the default): step i of one and step i
    # of the other did the same work, and the median of their ratios shrugs off a step that
    # another process on the machine slowed down.
    paired = [a / b for a, b in zip(step_times(ours), step_times(base)) if b > 0]
    return {
        "time": r("train_s"),
        "time_paired_median": statistics.median(paired) if paired else math.nan,
        "tokens_per_s": r("tokens_per_s"),
        "memory": r("peak_mb"),
        "eval_loss": r("eval_loss"),
        "eval_token_acc_diff": ours["eval_token_acc"] - base["eval_token_acc"],
    }


def check_targets(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's targets for our LoRA, where the runs they need are present and succeeded."""
    ok = {k: v for k, v in results.items() if "error" not in v}
    checks: dict[str, dict[str, Any]] = {}
    if "ours" not in ok:
        return checks
    ours = ok["ours"]
    value = ours.get("tokens_per_s")
    if value is not None:
        checks[f"tokens/s >= {TARGETS['tokens_per_s']:.0f} (ours)"] = {"value": value, "met": value >= TARGETS["tokens_per_s"]}
    if "peft-fp32" in ok:
        base = ok["peft-fp32"]
        value = ours["train_s"] / base["train_s"]
        limit = TARGETS["time_vs_peft_fp32"]
        checks[f"time <= {limit}x peft fp32"] = {"value": value, "met": value <= limit}
        value, limit = ours["peak_mb"] / base["peak_mb"], TARGETS["memory_vs_peft_fp32"]
        checks[f"peak memory <= {limit}x peft fp32"] = {"value": value, "met": value <= limit}
        value = ours["eval_loss"] / base["eval_loss"] - 1
        checks["eval loss within 2% of peft fp32"] = {"value": value, "met": abs(value) <= TARGETS["eval_loss_rel_diff"]}
        # "Same accuracy": no more than one held-out token (or 1 point) apart.
        value = ours["eval_token_acc"] - base["eval_token_acc"]
        slack = max(0.01, 1.0 / max(1, base["eval_tokens"]))
        checks["same held-out token accuracy as peft fp32"] = {"value": value, "met": value >= -slack}
    if "peft-bf16" in ok:
        value, limit = ours["train_s"] / ok["peft-bf16"]["train_s"], TARGETS["time_vs_peft_bf16"]
        checks[f"time <= {limit}x peft bf16"] = {"value": value, "met": value <= limit}
        if ours.get("precision") == "bfloat16":
            # bf16 autocast alone costs peft a few % of eval loss against fp32: where ours ran in bf16
            # (`auto` on a CPU with fast bf16), also judge it against the same precision, one-sided
            # (ours rounds the LoRA term once with the base product and may well come out better).
            value = ours["eval_loss"] / ok["peft-bf16"]["eval_loss"] - 1
            checks["eval loss at most 2% above peft bf16 (same precision)"] = {
                "value": value, "met": value <= TARGETS["eval_loss_rel_diff"]}
    return checks


# ---------------------------------------------------------------- output


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    job = report["job"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f" (native bf16: {'yes' if m['cpu_native_bf16'] else 'no'}; bf16 products at "
        f"{m.get('cpu_bf16_speedup', float('nan')):.2f}× the fp32 rate); torch {m['torch']}; {m['date']}.",
        f"Job: model {job['model']}, {job['train_rows']} training rows ({job['data']}), {job['eval_rows']} held-out rows, "
        f"{job['epochs']} epoch(s), batch {job['batch_size']}, rank {job['rank']}, alpha {job['alpha']}, "
        f"targets {job['target']}, dropout {job['dropout']}, lr {job['lr']}, seed {job['seed']}, {job['threads']} threads; "
        + ("the baseline takes our batches in our order and starts from our adapter init."
           if job.get("baseline_order", "ours") == "ours" else "the baseline takes consecutive rows in file order."),
        "",
        "| run | precision | steps | train time (s) | CPU time (s) | tokens/s | peak memory (MiB) "
        "| train loss (last 5 steps) | eval loss | eval token acc | eval reply acc | load avg before → after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:200]} |||||||||||")
            continue
        load = f"{_fmt((r.get('load_before') or [None])[0], '.2f')} → {_fmt((r.get('load_after') or [None])[0], '.2f')}"
        lines.append(
            f"| {name} | {r.get('precision') or '–'} | {r['steps']} | {_fmt(r['train_s'], '.1f')} | {_fmt(r.get('cpu_s'), '.1f')} "
            f"| {_fmt(r['tokens_per_s'], '.0f')} "
            f"| {_fmt(r['peak_mb'], '.0f')} | {_fmt(r['final_loss'], '.4f')} | {_fmt(r['eval_loss'], '.4f')} "
            f"| {_fmt(r['eval_token_acc'], '.3f')} | {_fmt(r['eval_reply_acc'], '.3f')} | {load} |"
        )
    compiled = [f"- {name}: compile {r['compile']}" for name, r in report["results"].items() if r.get("compile")]
    if compiled:  # what `compile: auto` decided, and why: a compiled run's tokens/s is not an eager one's
        lines += [""] + compiled
    if report.get("ratios"):
        paired = report["job"].get("baseline_order", "ours") == "ours"
        lines += ["", "| ours / baseline | time | step time (median of step-by-step ratios) | tokens/s | peak memory "
                  "| eval loss | token acc (diff) |", "|---|---|---|---|---|---|---|"]
        for base, r in report["ratios"].items():
            lines.append(
                f"| {base if '/' in base else 'ours / ' + base} | {_fmt(r['time'], '.2f')}x "
                f"| {_fmt(r['time_paired_median'], '.2f') + 'x' if paired else '– (different batches)'} "
                f"| {_fmt(r['tokens_per_s'], '.2f')}x "
                f"| {_fmt(r['memory'], '.2f')}x | {_fmt(r['eval_loss'], '.3f')}x | {_fmt(r['eval_token_acc_diff'], '+.3f')} |"
            )
    if report.get("targets"):
        lines += ["", "| target | value | met |", "|---|---|---|"]
        for name, t in report["targets"].items():
            lines.append(f"| {name} | {_fmt(t['value'], '.3f')} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def methods_markdown(report: dict[str, Any]) -> str:
    m, job = report["machine"], report["job"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}; {m['date']}. "
        f"Each method: {job['steps']} steps of batch {job['batch_size']} on {job['data']} "
        f"(model {job['model']}, method defaults for rank/alpha/lr), {job['threads']} threads.",
        "",
        "| method | precision | train time (s) | peak memory (MiB) | trainable params | train loss (last 5 steps) "
        "| eval loss | eval token acc | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:200]} ||||||||")
            continue
        lines.append(
            f"| {name} | {r.get('precision') or '–'} | {_fmt(r['train_s'], '.1f')} | {_fmt(r['peak_mb'], '.0f')} | {r['trainable_params']:,} "
            f"| {_fmt(r['final_loss'], '.4f')} | {_fmt(r['eval_loss'], '.4f')} | {_fmt(r['eval_token_acc'], '.3f')} "
            f"| {_fmt((r.get('load_before') or [None])[0], '.2f')} |"
        )
    return "\n".join(lines) + "\n"

