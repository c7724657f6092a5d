"""Runs tab, Bake-off panel: pick methods, start the series with one click (the Data tab's data
and the Train tab's settings, shared by every method), then the queue, the leaderboard as it
fills and the overlaid loss curves. The orchestration is lora_studio/bakeoff.py; this only calls
it and renders. Bake-offs live in RUNS/.bakeoffs/<id>; each belongs to the visitor who started it,
and every handler answers another visitor's bake-off as one that does not exist."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lora_studio import bakeoff
from lora_studio.methods import REGISTRY
from lora_studio.ui import charts
from lora_studio.ui.common import Studio, friendly
from lora_studio.ui.identity import Caller
from lora_studio.ui.train_tab import apply_limits, check_fair_share, check_remote_code

BAKEOFFS = ".bakeoffs"
_ID = re.compile(r"^bk[0-9]{8}-[0-9]{6}-[0-9a-f]{4}$")
BOARD = [*bakeoff.COLUMNS, "state", "note"]
QUEUE = ["method", "state", "run"]
TICK_S = 2.0


def bakeoffs_dir(studio: Studio) -> Path:
    return studio.runs_dir / BAKEOFFS


def bakeoff_dir(studio: Studio, caller: Caller, bk_id: Any) -> Path:
    """The folder of one of the caller's bake-offs; anything else is 'not found' alike."""
    if not isinstance(bk_id, str) or not _ID.match(bk_id):
        raise ValueError("Pick a bake-off first." if not bk_id else f"bake-off {bk_id!r} not found")
    path = bakeoffs_dir(studio) / bk_id
    if path.is_symlink() or not (path / bakeoff.BAKEOFF_FILE).exists():
        raise ValueError(f"bake-off {bk_id!r} not found")
    if not caller.owns(bakeoff.load(path).get("owner")):
        raise ValueError(f"bake-off {bk_id!r} not found")
    return path


def list_bakeoffs(studio: Studio, caller: Caller) -> list[tuple[str, str]]:
    """(label, id) of the caller's bake-offs, newest first."""
    root = bakeoffs_dir(studio)
    found = []
    for d in sorted(root.iterdir(), reverse=True) if root.is_dir() else []:
        if _ID.match(d.name) and (d / bakeoff.BAKEOFF_FILE).exists():
            spec = bakeoff.load(d)
            if caller.owns(spec.get("owner")):
                found.append((f"{d.name} ({', '.join(spec['methods'])})", d.name))
    return found


def start(studio: Studio, caller: Caller, config: Any, methods: list[str]) -> str:
    """Plan a bake-off with the shared settings and start its first method; returns its id."""
    check_remote_code(studio, config)
    config, _ = apply_limits(studio, config, caller)
    check_fair_share(studio, caller)
    wall = studio.settings.limits.wall_s if not caller.admin else 0
    bk_id = bakeoff.new_id()
    out = bakeoffs_dir(studio) / bk_id
    bakeoff.create(out, config, methods, owner=caller.owner, max_wall_s=wall or None, bk_id=bk_id)
    bakeoff.advance(out, studio.runner)
    return bk_id


def _can_start(studio: Studio, owner: str | None) -> bool:
    """The next method of `owner`'s bake-off may start: within the fair-share caps for now."""
    try:
        check_fair_share(studio, Caller(owner=owner or ""))
        return True
    except ValueError:
        return False


def start_background(studio: Studio, every_s: float = 5.0) -> threading.Thread:
    """Advance every bake-off from the app itself, so a series goes on with no page open."""

    def loop() -> None:
        while True:
            try:
                bakeoff.advance_all(bakeoffs_dir(studio), studio.runner, lambda owner: _can_start(studio, owner))
            except Exception as e:  # noqa: BLE001 - one bad folder must not stop the others for good
                print(f"bake-off: {e.__class__.__name__}: {e}", flush=True)
            time.sleep(every_s)

    thread = threading.Thread(target=loop, name="lora-studio-bakeoffs", daemon=True)
    thread.start()
    return thread


def render(studio: Studio, out: Path, state: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str]:
    queue = pd.DataFrame(state["queue"], columns=QUEUE)
    board = pd.DataFrame([{c: _round(r.get(c)) for c in BOARD} for r in state["rows"]], columns=BOARD)
    losses = []
    for item in state["queue"]:
        if item["run"] and studio.runner.run_dir(item["run"]).exists():
            losses += [{"step": m["step"], "loss": m["loss"], "series": item["method"]} for m in studio.runner.metrics(item["run"])]
    word = "cancelled" if state.get("cancelled") else "finished"
    text = f"Bake-off **{state['id']}**: " + (f"{word}." if state["finished"] else "in progress (one method at a time).")
    # every method's series present from the first point: a line plot colours only those it starts with
    curves = charts.with_series(charts.frame(losses, ["step", "loss", "series"]), "loss", tuple(q["method"] for q in state["queue"]))
    return queue, board, curves, text


def _round(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) else v


def build_bakeoff_panel(studio: Studio, view: gr.State) -> None:
    """Inside the Runs tab. `view.config_inputs` / `view.config_of` come from the Train tab."""
    with gr.Accordion("Bake-off: which method wins on my data?", open=False, elem_id="bakeoff"):
        gr.Markdown("Trains each method on the Data tab's data with the Train tab's settings (same seed and "
                    "budget; each method's own rank/lr defaults unless set), one after another, then scores each "
                    "on held-out rows: exact match, token F1, ROUGE-L of greedy replies.")  # fmt: skip
        with gr.Row():
            methods = gr.CheckboxGroup(list(REGISTRY), value=list(REGISTRY)[:2], label="Methods", elem_id="bakeoff-methods")
            go = gr.Button("Start bake-off", variant="primary", elem_id="bakeoff-start")
        with gr.Row():
            pick = gr.Dropdown(label="Bake-off", choices=[], allow_custom_value=True, elem_id="bakeoff-pick")
            cancel = gr.Button("Stop bake-off", elem_id="bakeoff-stop")
        message = gr.Markdown(elem_id="bakeoff-message")
        queue = gr.Dataframe(pd.DataFrame(columns=QUEUE), label="Queue", interactive=False, elem_id="bakeoff-queue")
        board = gr.Dataframe(pd.DataFrame(columns=BOARD), label="Leaderboard", interactive=False, wrap=True, elem_id="bakeoff-board")
        plot = gr.LinePlot(x="step", y="loss", color="series", title="Train loss by method", elem_id="bakeoff-loss", height=260)
        timer = gr.Timer(TICK_S)
    outputs = [queue, board, plot, message]

    def show(bk_id: Any, caller: Caller, advance: bool) -> tuple:
        out = bakeoff_dir(studio, caller, bk_id)
        if advance:  # also moved on by start_background; whoever holds its lock first does it
            owner = bakeoff.load(out).get("owner")
            state = bakeoff.advance(out, studio.runner, lambda: _can_start(studio, owner))
        else:
            state = bakeoff.progress(out, studio.runner)
        q, b, losses, text = render(studio, out, state)
        return q, b, charts.plot_value(losses), text

    @friendly
    def start_clicked(request: gr.Request, chosen, *config_values):  # the request first: gradio passes it by position
        caller = studio.caller(request)
        config = view.config_of(*config_values)  # type: ignore[attr-defined]
        bk_id = start(studio, caller, config, chosen or [])
        return (gr.update(choices=list_bakeoffs(studio, caller), value=bk_id), *show(bk_id, caller, False))

    @friendly
    def opened(bk_id, request: gr.Request):
        if not bk_id:
            return (gr.skip(),) * 4
        return show(bk_id, studio.caller(request), False)

    def tick(bk_id, request: gr.Request):
        if not bk_id:
            return (gr.skip(),) * 4
        try:
            return show(bk_id, studio.caller(request), True)
        except ValueError:
            return (gr.skip(),) * 4

    @friendly
    def stop_clicked(bk_id, request: gr.Request):
        out = bakeoff_dir(studio, studio.caller(request), bk_id)
        bakeoff.cancel(out, studio.runner)
        return show(bk_id, studio.caller(request), False)

    def listing(current, request: gr.Request):
        choices = list_bakeoffs(studio, studio.caller(request))
        ids = [v for _, v in choices]
        return gr.update(choices=choices, value=current if current in ids else next(iter(ids), None))

    go.click(start_clicked, [methods, *view.config_inputs], [pick, *outputs], api_name="bakeoff_start",  # type: ignore[attr-defined]
             concurrency_id="train", concurrency_limit=1, trigger_mode="once")  # fmt: skip
    pick.change(opened, pick, outputs, api_name="bakeoff_show")
    cancel.click(stop_clicked, pick, outputs, api_name="bakeoff_stop")
    timer.tick(tick, pick, outputs, api_name="bakeoff_tick", show_progress="hidden")
    studio.after_identify(listing, pick, pick, api_visibility="undocumented", queue=False)
