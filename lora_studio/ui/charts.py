"""What the live view draws, from a run's status and metric rows: plain functions returning
DataFrames and text, so they are tested without a browser. No training here, only reading."""

from __future__ import annotations

import html
import math
from typing import Any

import pandas as pd

from lora_studio import runfiles as rf

ACTIVE = rf.WAITING_STATES


def frame(records: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """Numeric columns typed as numbers even when empty: the page fixes each axis's scale from
    the first value it gets, and an empty untyped column would make it categorical for good."""
    out = pd.DataFrame(records, columns=columns)
    for col in columns:
        if col in ("series", "run"):
            out[col] = out[col].astype(str)
        else:
            out[col] = pd.to_numeric(out[col]).astype("int64" if col == "step" else "float64")
    return out


def plot_value(data: pd.DataFrame) -> pd.DataFrame | None:
    """What to hand a gr.LinePlot: None until there is a point. A coloured line plot fixes its
    colours from the first value it gets (gradio 6.31): from an empty frame it never draws a
    line, and a series that turns up later is left uncoloured. So: no empty frames; the
    series a plot will have are all present from the first value (`with_series`); and a plot
    that is pointed at another run is reset with None first."""
    return data if len(data) else None


def with_series(data: pd.DataFrame, y: str, names: tuple[str, ...]) -> pd.DataFrame:
    """Add one empty (NaN) point for each series in `names` that has no point yet."""
    if not len(data):
        return data
    missing = [n for n in names if n not in set(data["series"])]
    rows = [{"step": int(data["step"].iloc[0]), y: float("nan"), "series": n} for n in missing]
    return pd.concat([data, frame(rows, list(data.columns))], ignore_index=True) if rows else data


def loss_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """step, loss, series: every train loss (zeros kept) and every eval loss."""
    records = [{"step": r["step"], "loss": float(r["loss"]), "series": "train"} for r in rows if _num(r.get("loss"))]
    records += [
        {"step": r["step"], "loss": float(r["eval_loss"]), "series": "eval"} for r in rows if _num(r.get("eval_loss"))
    ]
    return frame(records, ["step", "loss", "series"])


def live_loss_frame(rows: list[dict[str, Any]], has_eval: bool) -> pd.DataFrame:
    """The loss frame of a run still training: its eval series is there before its first point."""
    return with_series(loss_frame(rows), "loss", ("train", "eval") if has_eval else ("train",))


def lr_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """step, lr, series: one line per parameter group (LoRA+ shows A and B apart)."""
    records = []
    for r in rows:
        lrs = r.get("lrs") or ([r["lr"]] if _num(r.get("lr")) else [])
        for i, lr in enumerate(lrs):
            records.append({"step": r["step"], "lr": float(lr), "series": f"group {i}" if len(lrs) > 1 else "lr"})
    return frame(records, ["step", "lr", "series"])


def memory_frame(rows: list[dict[str, Any]], estimate_mb: float | None, per_rank: bool = True) -> pd.DataFrame:
    """step, MiB, series: the measured peak (GPU where there is one, else process RSS) and the
    estimate made before training as a flat reference line over the same steps. A run on
    several processes logs every rank's peak (`rank_peak_mb`): one line per rank then (the
    estimate is per rank too), unless `per_rank` is False (rank 0 only, one line per run)."""
    key, label = ("cuda_peak_mb", "measured GPU peak") if any("cuda_peak_mb" in r for r in rows) else (
        "peak_rss_mb", "measured peak RSS"
    )
    records = []
    for r in rows:
        ranks = r.get("rank_peak_mb") if per_rank else None
        if isinstance(ranks, list) and all(_num(v) for v in ranks):
            records += [{"step": r["step"], "MiB": float(v), "series": f"{label}, rank {i}"} for i, v in enumerate(ranks)]
        elif _num(r.get(key)):
            records.append({"step": r["step"], "MiB": float(r[key]), "series": label})
    if estimate_mb and records:
        first, last = records[0]["step"], records[-1]["step"]
        name = "estimate per rank" if any(r.get("rank_peak_mb") for r in rows) else "estimate"
        records += [{"step": s, "MiB": float(estimate_mb), "series": name} for s in sorted({first, last})]
    return frame(records, ["step", "MiB", "series"])


def speed_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    records = [{"step": r["step"], "tokens/s": float(r["tokens_per_s"])} for r in rows if _num(r.get("tokens_per_s"))]
    return frame(records, ["step", "tokens/s"])


def estimate_mb(status: dict[str, Any]) -> float | None:
    est = status.get("memory_estimate") or {}
    value = est.get("total_mb")
    return float(value) if _num(value) else None


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def duration(seconds: float | None) -> str:
    if not _num(seconds):
        return "—"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_html(status: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """A progress bar with step, percent, elapsed and ETA (empty before the first step)."""
    total = status.get("total_steps")
    step = status.get("step") or 0
    if not total:
        return ""
    pct = max(0.0, min(100.0, 100.0 * step / total))
    last = rows[-1] if rows else {}
    eta = last.get("eta_s") if status.get("state") == rf.RUNNING else 0.0
    return (
        f'<div class="train-progress" data-step="{step}" data-total="{total}">'
        f'<progress max="100" value="{pct:.1f}" style="width:100%;height:14px"></progress>'
        f"<div>step {step} of {total} ({pct:.0f}%) · elapsed {duration(last.get('elapsed_s'))} · "
        f"ETA {duration(eta)}</div></div>"
    )


def status_markdown(run_id: str | None, status: dict[str, Any], run_path: str | None = None) -> str:
    """One plain paragraph saying what the run is doing or how it ended, and where its files are."""
    if not run_id:
        return "No run yet: pick data in the Data tab, then press **Start training**."
    state = status.get("state", "unknown")
    step, total = status.get("step") or 0, status.get("total_steps")
    of_total = f" of {total}" if total else ""
    where = f"\n\nFiles: `{run_path}`" if run_path else ""
    loss = f", loss {status['loss']:.4f}" if _num(status.get("loss")) else ""
    if state == rf.QUEUED:
        pos = status.get("queue_position")
        return (
            f"**{run_id}: queued**{f' (position {pos})' if pos else ''}. Another run is using the device; "
            "this one starts by itself when it is free."
        )
    if state == rf.STARTING:
        return f"**{run_id}: starting**: loading the model and the data…"
    if state == rf.RUNNING:
        stopping = status.get("stopping")
        note = {"stop": " Stop requested: saving at the end of this step…", "abort": " Abort requested…"}.get(
            stopping or "", ""
        )
        world = status.get("world_size") or 1
        ranks = f" on {world} processes ({str(status.get('strategy', 'ddp')).upper()})" if world > 1 else ""
        compiled = f" Compile: {status['compile']}" if status.get("compile") else ""
        if _num(status.get("compile_s")):
            compiled += f" ({status['compile_s']:.0f} s compiling so far)."
        return f"**{run_id}: training**{ranks}, step {step}{of_total}{loss}.{note}{compiled}"
    if state == rf.DONE:
        if status.get("stop_reason"):  # early stopping: why, at which step, and which step's adapter was kept
            return (f"**{run_id}: stopped early**: {status['stop_reason']}. Chat with it in **Compare**, "
                    f"download or push it in **Export**.{where}")  # fmt: skip
        return (
            f"**{run_id}: finished** after {step} steps{loss}. The adapter is saved in `adapter/`: chat with it in "
            f"**Compare**, download or push it in **Export**.{where}"
        )
    if state == rf.STOPPED:
        why = f" {str(status['message'])[0].upper()}{str(status['message'])[1:]}." if status.get("capped") and status.get("message") else ""
        return (
            f"**{run_id}: stopped** at step {step}{of_total}{loss}.{why} The adapter of that step is saved; resume the run "
            f"from the **Runs** tab.{where}"
        )
    if state == rf.ABORTED:
        return f"**{run_id}: aborted** at step {step}{of_total}; nothing was saved from it.{where}"
    if state == rf.FAILED:
        error = status.get("error") or "unknown error"
        tail = status.get("log_tail")
        log = f"\n\nLast lines of the log:\n```\n{tail}\n```" if tail else ""
        return f"**{run_id}: failed** at step {step}. {advice(error)}{log}{where}"
    return f"**{run_id}: {html.escape(str(state))}**"


def advice(error: str) -> str:
    """The error, plus what to do about it where we know."""
    text = error.strip()
    low = text.lower()
    if "row" in low and ("field" in low or "format" in low):
        return f"{text}\n\nFix the data (the **Data** tab lists every problem) or tick *Drop bad rows* in the advanced settings."
    if "config.json" in low or "not found" in low or "no such file" in low:
        return f"{text}\n\nCheck the model name or folder in the **Train** tab."
    return text


def probes_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Probe answers (RUN/probes.jsonl rows) as a table: one row per evaluation step, one column per prompt."""
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    by_step: dict[int, dict[str, Any]] = {}
    for r in rows:
        by_step.setdefault(r["step"], {"step": r["step"]})[r["prompt"]] = r["reply"]
    return pd.DataFrame([by_step[s] for s in sorted(by_step)], columns=["step", *prompts])
