"""Runs tab: the visitor's runs (every run for the operator) with method, settings and final
metrics; several runs' loss and memory curves overlaid (methods compared on the same data);
resume; delete with confirmation. Every handler acts only on the caller's own runs."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import gradio as gr
import pandas as pd

from lora_studio import runfiles as rf
from lora_studio.ui import charts
from lora_studio.ui.bakeoff_panel import build_bakeoff_panel
from lora_studio.ui.common import Studio, friendly
from lora_studio.ui.identity import Caller
from lora_studio.ui.train_tab import check_fair_share

FINISH_WAIT_S = 15.0  # how long Delete waits for a just-stopped run's process to exit

COLUMNS = [
    "run", "state", "method", "model", "rank", "lr", "batch", "steps", "final loss", "eval loss",
    "peak MiB", "estimate MiB", "trainable params", "data",
]  # fmt: skip


def _config(studio: Studio, run_id: str) -> dict[str, Any]:
    path = studio.runs_dir / run_id / "config.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def runs_table(studio: Studio, caller: Caller) -> pd.DataFrame:
    records = []
    for st in studio.list_runs(caller):
        cfg = _config(studio, st["run_id"])
        peak = st.get("cuda_peak_mb", st.get("peak_rss_mb"))
        records.append(
            {
                "run": st["run_id"],
                "state": st.get("state"),
                "method": cfg.get("method", st.get("method")),
                "model": cfg.get("model", st.get("model")),
                "rank": cfg.get("rank"),
                "lr": cfg.get("lr"),
                "batch": cfg.get("batch_size"),
                "steps": f"{st.get('step', 0)}/{st.get('total_steps') or '?'}",
                "final loss": _round(st.get("loss")),
                "eval loss": _round(st.get("eval_loss")),
                "peak MiB": _round(peak, 0),
                "estimate MiB": _round(charts.estimate_mb(st), 0),
                "trainable params": st.get("trainable_params"),
                "data": data_name(cfg.get("data") or ""),
            }
        )
    return pd.DataFrame(records, columns=COLUMNS)


def data_name(data: str) -> str:
    """A file's name as the user gave it (uploads are stored as `<digest>-<name>`)."""
    name = data.rsplit("/", 1)[-1]
    return re.sub(r"^[0-9a-f]{12}-", "", name) if "/.uploads/" in data else name


def _round(value: Any, digits: int = 4) -> Any:
    return round(float(value), digits) if isinstance(value, (int, float)) else None


def overlay(studio: Studio, run_ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Loss and memory of several runs on one pair of charts, one colour per run."""
    losses, memory = [], []
    for run_id in run_ids or []:
        rows = studio.runner.metrics(run_id)
        for r in charts.loss_frame(rows).to_dict("records"):
            losses.append({"step": r["step"], "loss": r["loss"], "run": f"{run_id} ({r['series']})"})
        for r in charts.memory_frame(rows, None, per_rank=False).to_dict("records"):
            memory.append({"step": r["step"], "MiB": r["MiB"], "run": run_id})
    return charts.frame(losses, ["step", "loss", "run"]), charts.frame(memory, ["step", "MiB", "run"])


def build_runs_tab(studio: Studio, demo: gr.Blocks, view: gr.State, view_outputs: list[gr.Component]) -> None:
    with gr.Tab("Runs", id="runs") as tab:
        with gr.Row():
            refresh = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
        # Empty when the page is built: filled on load with the visitor's own runs.
        table = gr.Dataframe(value=pd.DataFrame(columns=COLUMNS), label="Runs", elem_id="runs-table", interactive=False, wrap=True)
        picked = gr.Dropdown(
            label="Runs to overlay (same data: compare methods)",
            choices=[],
            multiselect=True,
            allow_custom_value=True,
            elem_id="runs-pick",
        )
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="loss", color="run", title="Loss", elem_id="runs-loss-plot", height=280)
            memory_plot = gr.LinePlot(x="step", y="MiB", color="run", title="Memory (MiB)", elem_id="runs-memory-plot", height=280)
        with gr.Row():
            one = gr.Dropdown(label="Run", choices=[], allow_custom_value=True, elem_id="runs-one")
            show = gr.Button("Show in Train tab", elem_id="runs-show")
            resume = gr.Button("Resume", elem_id="runs-resume")
            delete = gr.Button("Delete…", variant="stop", elem_id="runs-delete")
        with gr.Row(visible=False) as confirm_row:
            confirm_text = gr.Markdown()
            confirm = gr.Button("Yes, delete it", variant="stop", elem_id="runs-delete-confirm")
            cancel = gr.Button("Cancel", elem_id="runs-delete-cancel")
        message = gr.Markdown(elem_id="runs-message")
        build_bakeoff_panel(studio, view)

    def listing(current_pick, current_one, caller: Caller):
        choices = studio.runs(caller)
        ids = [v for _, v in choices]
        return (
            runs_table(studio, caller),
            gr.update(choices=choices, value=[r for r in current_pick or [] if r in ids]),
            gr.update(choices=choices, value=current_one if current_one in ids else next(iter(ids), None)),
        )

    def refreshed(current_pick, current_one, request: gr.Request):
        return listing(current_pick, current_one, studio.caller(request))

    @friendly
    def draw(run_ids, request: gr.Request):
        caller = studio.caller(request)
        if isinstance(run_ids, str):
            run_ids = [run_ids]
        for run_id in run_ids or []:
            studio.check_run(run_id, caller)  # ids that could leave the runs folder, or another visitor's run
        yield None, None  # a reset, so each run picked gets its colour (see charts.plot_value)
        yield tuple(charts.plot_value(f) for f in overlay(studio, run_ids))

    @friendly
    def show_run(run_id, request: gr.Request):
        caller = studio.caller(request)
        studio.check_run(run_id, caller)
        yield from view.switch_to(run_id, caller)

    @friendly
    def resume_run(run_id, view_state, request: gr.Request):
        caller = studio.caller(request)
        studio.run_dir(run_id, caller)
        if studio.runner.status(run_id).get("state") not in rf.WAITING_STATES:
            check_fair_share(studio, caller)  # a resumed run is queued again: one per visitor still
        studio.runner.resume(run_id)
        message = f"Run **{run_id}** resumes from its last checkpoint; follow it in the Train tab."
        for outputs in view.switch_to(run_id, caller):
            yield (message, *outputs)

    def ask_delete(run_id, request: gr.Request):
        if not run_id:
            raise gr.Error("Pick a run first.")
        studio.run_dir(run_id, studio.caller(request))
        return gr.Row(visible=True), f"Delete **{run_id}** and all its files (adapter, checkpoints, metrics)?"

    @friendly
    def do_delete(run_id, current_pick, request: gr.Request):
        caller = studio.caller(request)
        studio.run_dir(run_id, caller)
        deadline = time.monotonic() + FINISH_WAIT_S
        while True:
            try:
                studio.runner.delete(run_id)
                break
            except ValueError:
                # A run that has just stopped: its state is final but its process is still exiting
                # (the runner refuses until it is gone). Worth a short wait; anything else is the answer.
                finished = studio.runner.status(run_id).get("state") in rf.FINAL_STATES
                if not finished or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if studio.chat is not None:
            studio.chat.unload()  # it may hold this run's adapter
        table_value, pick, one_update = listing(current_pick, None, caller)
        return gr.Row(visible=False), f"Deleted {run_id}.", table_value, pick, one_update

    pickers = [table, picked, one]
    refresh.click(refreshed, [picked, one], pickers, api_name="runs", queue=False)
    tab.select(refreshed, [picked, one], pickers, api_visibility="undocumented", queue=False)
    studio.after_identify(refreshed, [picked, one], pickers, api_visibility="undocumented", queue=False)
    picked.change(draw, picked, [loss_plot, memory_plot], api_name="overlay")
    show.click(show_run, one, view_outputs, api_visibility="undocumented")
    resume.click(resume_run, [one, view], [message, *view_outputs], api_name="resume", concurrency_id="train")
    delete.click(ask_delete, one, [confirm_row, confirm_text], api_visibility="undocumented", queue=False)
    cancel.click(lambda: gr.Row(visible=False), None, confirm_row, api_visibility="undocumented", queue=False)
    confirm.click(do_delete, [one, picked], [confirm_row, message, *pickers], api_name="delete")
