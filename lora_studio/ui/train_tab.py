"""Train tab: model, method and settings; trainable parameters and the memory estimate before
starting; Start / Stop (save) / Abort; live progress and charts polled from the run folder.

The page holds no training: Start hands a TrainConfig to the runner, which trains in its own
process, and every chart is redrawn from the run folder. A reloaded page reattaches on load to
the visitor's own running run (never to another visitor's: see ui/identity.py).
"""

from __future__ import annotations

import json
import math
from typing import Any

import gradio as gr

from lora_studio import runfiles as rf
from lora_studio.config import TrainConfig
from lora_studio.methods import REGISTRY, get_method
from lora_studio.models import BUNDLED, check_model_spec
from lora_studio.preflight import preflight
from lora_studio.probes import read_probes
from lora_studio.ui import charts
from lora_studio.ui.common import Studio, friendly
from lora_studio.ui.identity import Caller
from lora_studio.ui.settings import REMOTE_CODE_ENV

POLL_S = 1.5
# Settings widgets, by TrainConfig field (the order of the event inputs).
FIELDS = (
    "model", "quantize", "method", "rank", "alpha", "lr", "lr_ratio", "epochs", "batch_size", "max_seq_len",
    "dropout", "max_steps", "target", "seed", "warmup_ratio", "weight_decay", "use_rslora", "val_fraction",
    "packing", "drop_invalid", "grad_accum_steps", "gradient_checkpointing", "precision", "checkpoint_every",
    "eval_every", "method_options", "probes", "early_stop", "strategy", "trust_remote_code",
)  # fmt: skip

STRATEGIES = [
    ("auto: DDP if the model fits one GPU, else FSDP", "auto"),
    ("DDP: the whole model on each GPU", "ddp"),
    ("FSDP: the model sharded over the GPUs (1/N each)", "fsdp"),
]


def visible_gpus(studio: Studio) -> int:
    """The GPUs a run started here uses (the runner's `--gpus`): 0 without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0
    gpus = str(getattr(studio.runner, "gpus", "auto"))
    return torch.cuda.device_count() if gpus == "auto" else min(int(gpus), torch.cuda.device_count())


def method_line(name: str) -> str:
    m = get_method(name)
    return f"**{m.title}**: {m.summary} *({m.paper})*"


DEFAULT_METHOD = TrainConfig().method


def _uses_lr_ratio(name: str) -> bool:
    m = get_method(name)
    return m.uses_lr_ratio


def method_defaults(name: str) -> tuple[Any, ...]:
    """rank, alpha, lr, lr_ratio (+ its interactivity), dropout, method options for a method."""
    cfg = TrainConfig(method=name).resolved()
    options = {k: v for k, v in cfg.method_options.items()}
    ratio = gr.update(value=cfg.lr_ratio, interactive=_uses_lr_ratio(name))
    return (
        method_line(name), cfg.rank, cfg.alpha, cfg.lr, ratio, cfg.dropout, json.dumps(options) if options else ""
    )


def build_config(values: dict[str, Any], selection: dict[str, Any] | None) -> TrainConfig:
    """A TrainConfig from the widgets and the Data tab's choice (checked by the caller)."""
    if not selection or not selection.get("data"):
        raise ValueError("Pick the training data in the Data tab first.")
    if selection.get("ok") is False:
        raise ValueError("The data in the Data tab has problems: fix them, or tick 'Drop bad rows' in Advanced.")
    v = dict(values)
    options = (v.pop("method_options") or "").strip()
    try:
        method_options = json.loads(options) if options else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"method options must be JSON, e.g. {{\"d_initial\": 0.1}} ({e.msg})") from None
    if not isinstance(method_options, dict):
        raise ValueError("method options must be a JSON object")
    v["probes"] = [line.strip() for line in (v.get("probes") or "").splitlines() if line.strip()]
    ints = ("rank", "batch_size", "max_seq_len", "seed", "grad_accum_steps", "checkpoint_every", "eval_every", "early_stop")
    for key in ints:
        v[key] = _number(key, v[key], int)
    for key in ("epochs", "warmup_ratio", "weight_decay", "val_fraction"):
        v[key] = _number(key, v[key], float)
    for key in ("alpha", "lr", "lr_ratio", "dropout"):  # empty: the method's default
        v[key] = None if v[key] is None else _number(key, v[key], float)
    v["max_steps"] = _number("max_steps", v["max_steps"], int) if v.get("max_steps") else None
    # The number boxes carry no gradio minimum: its message would not say which box; these do.
    if v["weight_decay"] < 0:
        raise ValueError(f"weight_decay must be 0 or more (got {v['weight_decay']})")
    if v["alpha"] is not None and not v["alpha"] > 0:
        raise ValueError(f"alpha must be positive (got {v['alpha']})")
    v["quantize"] = "4bit" if v.pop("quantize") else None
    v["model"] = (v.get("model") or BUNDLED).strip()
    return TrainConfig(
        data=selection["data"],
        format=selection.get("format"),
        columns=selection.get("columns") or {},
        system_prompt=selection.get("system_prompt"),
        method_options=method_options,
        **v,
    )


def _number(name: str, value: Any, kind: type) -> Any:
    """A number field as int or float, or a message naming the field (empty, NaN, infinite)."""
    if value is None or value == "":
        raise ValueError(f"{name} is empty: enter a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number (got {value!r})") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number (got {value!r})")
    if kind is int:
        if number != int(number):
            raise ValueError(f"{name} must be a whole number (got {value!r})")
        return int(number)
    return number


REMOTE_CODE_OFF = (
    "Trust remote code is turned off on this server: a model repo's own Python code is never run here "
    f"(the operator of a local server may allow it with {REMOTE_CODE_ENV}=1; a public server never does)"
)


def check_remote_code(studio: Studio, cfg: TrainConfig) -> None:
    if cfg.trust_remote_code and not (studio.settings.allow_remote_code and not studio.settings.public):
        raise ValueError(REMOTE_CODE_OFF)


def apply_limits(studio: Studio, cfg: TrainConfig, caller: Caller) -> tuple[TrainConfig, str]:
    """The run's settings within this server's caps (public mode; admins and local mode have
    none): refused, naming the setting and the cap, or a run by epochs cut at the step cap.
    Returns the config and a note for the page ("" when nothing was changed)."""
    lim = studio.settings.limits
    if caller.admin:
        return cfg, ""
    if lim.epochs and cfg.epochs > lim.epochs:
        raise ValueError(f"epochs: {cfg.epochs:g} is over this server's limit of {lim.epochs:g} per run (LORA_STUDIO_MAX_EPOCHS)")
    if lim.seq_len and cfg.max_seq_len > lim.seq_len:
        raise ValueError(
            f"max length: {cfg.max_seq_len} tokens is over this server's limit of {lim.seq_len} (LORA_STUDIO_MAX_SEQ_LEN)"
        )
    if lim.batch_prompts and len(cfg.probes) > lim.batch_prompts:
        raise ValueError(
            f"probes: {len(cfg.probes)} prompts is over this server's limit of {lim.batch_prompts} (LORA_STUDIO_MAX_BATCH_PROMPTS)"
        )
    if lim.prompt_chars and any(len(p) > lim.prompt_chars for p in cfg.probes):
        raise ValueError(f"probes: a prompt is over this server's limit of {lim.prompt_chars} characters (LORA_STUDIO_MAX_PROMPT_CHARS)")
    if lim.new_tokens:  # probe answers are replies too
        cfg.probe_max_new_tokens = min(cfg.probe_max_new_tokens, lim.new_tokens)
    note = ""
    if lim.steps:
        if cfg.max_steps and cfg.max_steps > lim.steps:
            raise ValueError(
                f"max steps: {cfg.max_steps} is over this server's limit of {lim.steps} per run (LORA_STUDIO_MAX_STEPS)"
            )
        if not cfg.max_steps:
            cfg.max_steps = lim.steps  # a cap, not a target: a shorter run by epochs stays shorter
            note = f"at most {lim.steps} steps on this server (LORA_STUDIO_MAX_STEPS)"
    return cfg, note


def check_fair_share(studio: Studio, caller: Caller) -> None:
    """One queued-or-running run per visitor, and a bounded queue, in public mode."""
    lim = studio.settings.limits
    if caller.admin or not (lim.runs_per_visitor or lim.queue):
        return
    waiting = [r for r in studio.runner.list_runs() if r.get("state") in rf.WAITING_STATES]
    mine = [r["run_id"] for r in waiting if studio.owns(caller, r["run_id"])]
    if lim.runs_per_visitor and len(mine) >= lim.runs_per_visitor:
        raise ValueError(
            f"you already have {len(mine)} run(s) queued or training ({', '.join(mine)}); this server allows "
            f"{lim.runs_per_visitor} per visitor (LORA_STUDIO_MAX_RUNS_PER_VISITOR): stop it or wait for it to end"
        )
    if lim.queue and len(waiting) >= lim.queue:
        raise ValueError(
            f"the queue is full ({len(waiting)} runs queued or training, LORA_STUDIO_MAX_QUEUE): try again later"
        )


def check_start(studio: Studio, cfg: TrainConfig, selection: dict[str, Any]) -> None:
    """Refuse here, with a message naming the setting, what the worker would otherwise only
    find out after a run folder exists: a model that is not there, a batch larger than the
    data, a target that matches nothing, a memory estimate beyond this machine (the last three
    are lora_studio.preflight's, the CLI's too)."""
    cfg = cfg.resolved()
    check_remote_code(studio, cfg)
    studio.check_model(cfg.model)  # a folder on the server, where local models are off
    check_model_spec(cfg.model)
    if not cfg.trust_remote_code:  # a custom tokenizer would need the opt-in: the worker checks that one
        studio.tokenizer(cfg.model)  # a Hub id that is wrong, or not cached while offline
    preflight(cfg, rows=selection.get("rows"), max_tokens=selection.get("max_tokens"), world=max(1, visible_gpus(studio)))


def preflight_text(cfg: TrainConfig, seq_len: int | None, world: int = 1) -> str:
    """Parameters and the memory estimate (per rank on several GPUs, for the strategy the run
    will use), and warnings about settings this machine cannot honour."""
    import torch

    from lora_studio.engine.memory import estimate
    from lora_studio.engine.plan import make_plan

    # per rank for the strategy the run will use (auto decided; fsdp refused where it cannot work)
    plan = make_plan(cfg, "cuda" if torch.cuda.is_available() else "cpu", world)
    cfg = plan.cfg
    est = estimate(plan, seq_len=seq_len)
    share = 100.0 * est.trainable_params / max(1, est.total_params)
    text = (
        f"**Before you start** · trainable parameters: **{est.trainable_params:,}** of {est.total_params:,} "
        f"({share:.2f}%) · memory estimate: **{est.summary()}**"
    )
    if cfg.quantize == "4bit" and not torch.cuda.is_available():
        text += "\n\n⚠ A 4-bit base needs a CUDA GPU and this machine has none: untick it to train here."
    if cfg.quantize == "4bit" and world > 1:
        text += "\n\nA 4-bit base trains with DDP on every GPU: bitsandbytes' NF4 weights do not shard under FSDP."
    if cfg.trust_remote_code:
        text += "\n\n⚠ Trust remote code is on: the model repo's Python code will run on this machine."
    return text


def build_train_tab(studio: Studio, demo: gr.Blocks, selection: gr.State, model: gr.Dropdown, max_len: gr.Slider) -> gr.State:
    """Returns the per-visitor view state ({"run_id", "rows", "step"}) the Runs tab can point elsewhere."""
    defaults = TrainConfig().resolved()
    with gr.Tab("Train", id="train"):
        view = gr.State({})
        with gr.Row():
            model.render()
            quantize = gr.Checkbox(label="4-bit base (QLoRA; needs a CUDA GPU)", value=False, elem_id="quantize")
        with gr.Row():
            method = gr.Dropdown(
                label="Method", choices=[(m.title, m.name) for m in REGISTRY.values()], value=DEFAULT_METHOD, elem_id="method"
            )
            method_info = gr.Markdown(method_line(DEFAULT_METHOD), elem_id="method-summary")
        with gr.Row():
            rank = gr.Number(label="Rank r", value=defaults.rank, precision=0, elem_id="rank")
            alpha = gr.Number(label="Alpha (scale = alpha / r)", value=defaults.alpha, elem_id="alpha")
            lr = gr.Number(label="Learning rate", value=defaults.lr, elem_id="lr")
            lr_ratio = gr.Number(
                label="LR ratio ηB/ηA (LoRA+)", value=1.0, interactive=_uses_lr_ratio(DEFAULT_METHOD), elem_id="lr-ratio"
            )
        with gr.Row():
            epochs = gr.Number(label="Epochs", value=1.0, elem_id="epochs")
            batch_size = gr.Number(label="Batch size", value=8, precision=0, elem_id="batch-size")
            max_len.render()
        with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
            with gr.Row():
                dropout = gr.Number(label="Adapter dropout", value=defaults.dropout)
                max_steps = gr.Number(label="Max steps (0 = by epochs)", value=0, precision=0, elem_id="max-steps")
                target = gr.Textbox(label="Target layers", value="all-linear")
                seed = gr.Number(label="Seed", value=0, precision=0)
            with gr.Row():
                warmup = gr.Number(label="Warmup ratio", value=0.03)
                weight_decay = gr.Number(label="Weight decay", value=0.0)
                rslora = gr.Checkbox(label="rsLoRA scaling (alpha / √r)", value=False)
                val_fraction = gr.Number(label="Validation fraction (eval loss)", value=0.0, elem_id="val-fraction")
            with gr.Row():
                packing = gr.Checkbox(label="Pack samples (no padding)", value=False)
                drop_invalid = gr.Checkbox(label="Drop bad rows (instead of refusing the data)", value=False)
                accum = gr.Number(label="Gradient accumulation steps", value=1, precision=0)
                checkpointing = gr.Checkbox(label="Gradient checkpointing (less memory, slower)", value=False)
            with gr.Row():
                precision = gr.Dropdown(label="Precision", choices=["auto", "fp32", "bf16", "fp16"], value="auto")
                checkpoint_every = gr.Number(label="Checkpoint every N steps", value=50, precision=0)
                eval_every = gr.Number(label="Eval every N steps", value=50, precision=0)
                options = gr.Textbox(label="Method options (JSON)", value="", elem_id="method-options")
            with gr.Row():
                probes = gr.Textbox(
                    label="Probe prompts (one per line): answered greedily at each evaluation", lines=2, elem_id="probes"
                )
                early_stop = gr.Number(
                    label="Early stop: evaluations without a better eval loss (0 = off; keeps the best)", value=0,
                    precision=0, elem_id="early-stop",
                )  # fmt: skip
            # Only where the runs get more than one GPU: one process has nothing to share out.
            strategy = gr.Dropdown(
                label="Multi-GPU strategy", choices=STRATEGIES, value="auto", visible=visible_gpus(studio) > 1,
                info="FSDP holds 1/N of the model per GPU; not with a 4-bit base (it stays on DDP), LoRA-Pro, "
                "Delta-LoRA or LoRA-FA's projected gradient. See docs/distributed.md.",
                elem_id="strategy",
            )
            # Offered only where the operator allowed it at launch on a local server; kept hidden
            # otherwise (its place in /start's inputs stays), and refused over the API.
            trust = gr.Checkbox(
                label="⚠ Trust remote code: run Python code from the model's Hub repo (only for repos you trust)",
                value=False,
                visible=studio.settings.allow_remote_code and not studio.settings.public,
                elem_id="trust-remote-code",
            )
        preflight = gr.Markdown(elem_id="preflight")
        with gr.Row():
            start = gr.Button("Start training", variant="primary", elem_id="train-start")
            stop = gr.Button("Stop (save)", elem_id="train-stop")
            abort = gr.Button("Abort", variant="stop", elem_id="train-abort")
        status = gr.Markdown(charts.status_markdown(None, {}), elem_id="run-status")
        progress = gr.HTML(elem_id="train-progress")
        with gr.Row():
            loss_plot = gr.LinePlot(
                x="step", y="loss", color="series", title="Loss", elem_id="loss-plot", height=260
            )
            memory_plot = gr.LinePlot(
                x="step", y="MiB", color="series", title="Memory (MiB)", elem_id="memory-plot", height=260
            )
        with gr.Row():
            lr_plot = gr.LinePlot(x="step", y="lr", color="series", title="Learning rate", elem_id="lr-plot", height=220)
            speed_plot = gr.LinePlot(x="step", y="tokens/s", title="Tokens/s", elem_id="speed-plot", height=220)
        probes_table = gr.Dataframe(label="Probe answers by step", interactive=False, wrap=True, elem_id="probes-table")
        timer = gr.Timer(POLL_S)

    widgets = [
        model, quantize, method, rank, alpha, lr, lr_ratio, epochs, batch_size, max_len, dropout, max_steps, target,
        seed, warmup, weight_decay, rslora, val_fraction, packing, drop_invalid, accum, checkpointing, precision,
        checkpoint_every, eval_every, options, probes, early_stop, strategy, trust,
    ]  # fmt: skip
    assert len(widgets) == len(FIELDS)

    def values_of(args: tuple) -> dict[str, Any]:
        return dict(zip(FIELDS, args))

    method.change(
        method_defaults, method, [method_info, rank, alpha, lr, lr_ratio, dropout, options], api_visibility="undocumented"
    )

    @friendly
    def check(sel, *args):
        try:
            cfg = build_config(values_of(args), sel or {"data": "(data not chosen yet)"})
            check_remote_code(studio, cfg)
            studio.check_model(cfg.model)  # no sizes of a server folder's model either
            check_model_spec(cfg.model)  # a missing folder named as such, not as a bad Hub id
            return preflight_text(cfg, (sel or {}).get("max_tokens"), max(1, visible_gpus(studio)))
        except Exception as e:  # noqa: BLE001 - shown as advice; Start reports it again as an error
            return f"**Settings to fix:** {e}"

    gr.on(
        [w.change for w in (model, quantize, method, rank, alpha, lr, lr_ratio, batch_size, max_len, target, accum,
                            checkpointing, precision, options, strategy)] + [selection.change, demo.load],
        check, [selection, *widgets], preflight, trigger_mode="always_last", api_name="preflight",
    )  # fmt: skip

    outputs = [view, status, progress, loss_plot, memory_plot, lr_plot, speed_plot]

    @friendly
    def start_run(request: gr.Request, sel, *args):  # the request first: gradio passes it by position
        caller = studio.caller(request)
        cfg = build_config(values_of(args), sel)
        check_remote_code(studio, cfg)
        cfg, note = apply_limits(studio, cfg, caller)
        check_fair_share(studio, caller)
        check_start(studio, cfg, sel)
        wall = studio.settings.limits.wall_s if not caller.admin else 0
        run_id = studio.runner.start(cfg, owner=caller.owner, max_wall_s=wall or None)
        yield from switch_to(run_id, caller)

    def redraw(run_id: str | None, caller: Caller, view_state: dict | None = None, force: bool = True) -> tuple:
        """Everything the live view shows, read from the run folder; gr.skip() where nothing changed.
        A run that is not the caller's is drawn as no run at all."""
        if not run_id or not studio.owns(caller, run_id):
            return ({}, charts.status_markdown(None, {}), "", *([gr.skip()] * 4))
        state = view_state if view_state and view_state.get("run_id") == run_id else {"run_id": run_id, "rows": []}
        try:
            st = studio.runner.status(run_id)
        except (FileNotFoundError, ValueError):  # deleted meanwhile
            return ({}, charts.status_markdown(None, {}), "", *([gr.skip()] * 4))
        last = state["rows"][-1]["step"] if state["rows"] else 0
        new_rows = studio.runner.metrics(run_id, since=last)
        if new_rows and new_rows[0]["step"] <= last:  # a resume rewrote the history
            state["rows"], new_rows = [], studio.runner.metrics(run_id)
        rows = state["rows"] + new_rows
        where = None if studio.settings.public else str(studio.runner.run_dir(run_id).resolve())  # no server paths
        text = charts.status_markdown(run_id, st, where)
        bar = charts.progress_html(st, rows)
        unchanged = not force and (text, bar) == (state.get("text"), state.get("bar"))
        state = {"run_id": run_id, "rows": rows, "state": st.get("state"), "text": text, "bar": bar}
        if not new_rows and not force:  # nothing new: leave the page as it is (no redraw, no flicker)
            return (state, gr.skip() if unchanged else text, gr.skip() if unchanged else bar, *([gr.skip()] * 4))
        return (
            state,
            text,
            bar,
            charts.plot_value(charts.live_loss_frame(rows, bool(st.get("n_val_examples")))),
            charts.plot_value(charts.memory_frame(rows, charts.estimate_mb(st))),
            charts.plot_value(charts.lr_frame(rows)),
            charts.plot_value(charts.speed_frame(rows)),
        )

    def switch_to(run_id: str | None, caller: Caller):
        """Point this page's view at one of the caller's runs: the plots are reset first, so the
        new run's series get their colours (see charts.plot_value)."""
        drawn = redraw(run_id, caller)
        yield (*drawn[:3], None, None, None, None)
        yield drawn

    def tick(view_state, request: gr.Request):
        view_state = view_state or {}
        run_id = view_state.get("run_id")
        if not run_id:
            return (view_state, *([gr.skip()] * 6))
        studio.poll()  # launch a queued run, mark a dead one: at most every few seconds, whatever the pages
        return redraw(run_id, studio.caller(request), view_state, force=False)  # a finished run may be resumed

    def attach(view_state, request: gr.Request):
        """On page load: the caller's running run (else their next queued one, else their newest),
        drawn from its files; never another visitor's. Running first: the queue is newest first
        too, and a run queued after it must not make every new page show that one instead."""
        caller = studio.caller(request)
        runs = studio.list_runs(caller)
        training = [r for r in runs if r.get("state") in rf.ACTIVE_STATES]
        queued = sorted((r for r in runs if r.get("state") == rf.QUEUED), key=lambda r: r.get("queue_position") or 0)
        pick = (training or queued or runs or [{}])[0].get("run_id")
        return redraw(pick, caller)

    def request_stop(view_state, save: bool, caller: Caller):
        run_id = (view_state or {}).get("run_id")
        if not run_id or not studio.owns(caller, run_id):
            raise gr.Error("No run to stop.")
        studio.runner.stop(run_id, save=save)
        return redraw(run_id, caller, view_state)

    def stop_run(view_state, request: gr.Request):
        return request_stop(view_state, True, studio.caller(request))

    def abort_run(view_state, request: gr.Request):
        return request_stop(view_state, False, studio.caller(request))

    start.click(
        start_run, [selection, *widgets], outputs, api_name="start", concurrency_id="train", concurrency_limit=1,
        trigger_mode="once",
    )  # fmt: skip
    stop.click(stop_run, view, outputs, api_name="stop", queue=False)
    abort.click(abort_run, view, outputs, api_name="abort", queue=False)
    timer.tick(tick, view, outputs, api_visibility="undocumented", queue=False, show_progress="hidden")

    def probe_answers(view_state, shown, request: gr.Request):
        """The view's run's probes.jsonl as a table (a step per row, a prompt per column); only the owner's."""
        run_id = (view_state or {}).get("run_id")
        if not run_id or not studio.owns(studio.caller(request), run_id):
            return None
        frame = charts.probes_frame(read_probes(studio.runner.run_dir(run_id)))
        same = shown is not None and len(getattr(shown, "index", [])) == len(frame) and list(shown.columns) == list(frame.columns)
        return gr.skip() if same and len(frame) else frame

    timer.tick(probe_answers, [view, probes_table], probes_table, api_name="probes", queue=False, show_progress="hidden")
    studio.after_identify(attach, view, outputs, api_name="attach", queue=False)
    # The Runs tab points the view at another run (resume, show) through these.
    view.switch_to = switch_to  # type: ignore[attr-defined]
    view.outputs = outputs  # type: ignore[attr-defined]
    # The Runs tab's bake-off trains with these same settings: config_of(selection, *widget values).
    view.config_inputs = [selection, *widgets]  # type: ignore[attr-defined]
    view.config_of = lambda sel, *args: build_config(values_of(args), sel)  # type: ignore[attr-defined]
    return view
