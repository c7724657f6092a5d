"""The page: a header and one tab per step of the journey (Data, Train, Runs, Compare, Export)."""

from __future__ import annotations

import gradio as gr
from starlette.middleware import Middleware

from lora_studio.models import BUNDLED
from lora_studio.ui.common import Studio, dropdown_update
from lora_studio.ui.compare_tab import build_compare_tab
from lora_studio.ui.data_tab import build_data_tab
from lora_studio.ui.export_tab import build_export_tab
from lora_studio.ui.login import LoginWall
from lora_studio.ui.runs_tab import build_runs_tab
from lora_studio.ui.settings import AppSettings
from lora_studio.ui.train_tab import build_train_tab


def build_app(settings: AppSettings | None = None) -> gr.Blocks:
    settings = settings or AppSettings.from_env()
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    studio = Studio(settings)
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown(
            "# LoRA Studio\nFine-tune a language model from your browser: "
            "**Data** → **Train** → **Runs** → **Compare** → **Export**."
        )
        # Shown in the Train tab, read by the Data tab's preview too (template, truncation).
        model = gr.Dropdown(
            label="Base model: bundled, a Hub id" + (" or a local folder" if settings.local_models else ""),
            choices=list(dict.fromkeys([settings.model, BUNDLED])),
            value=settings.model,
            allow_custom_value=True,
            elem_id="model",
            render=False,
        )
        max_len = gr.Slider(32, 4096, value=512, step=32, label="Max length (tokens)", elem_id="max-len", render=False)
        with gr.Tabs(elem_id="tabs"):
            selection = build_data_tab(studio, model, max_len)
            view = build_train_tab(studio, demo, selection, model, max_len)
            build_runs_tab(studio, demo, view, view.outputs)
            build_compare_tab(studio)
            build_export_tab(studio)
        run_pickers = [c for c in demo.blocks.values() if getattr(c, "elem_id", None) in ("compare-run", "export-run")]
        demo.load(
            lambda *current: [dropdown_update(studio.runs(need_adapter=True), c) for c in current],
            run_pickers,
            run_pickers,
            api_visibility="undocumented",
            queue=False,
        )
    demo.studio = studio  # type: ignore[attr-defined]  # for tests and app.py
    return demo


def launch(settings: AppSettings, **kwargs) -> None:
    """Serve the app: queue on (one training start and one generation at a time), login if set."""
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=1, max_size=64)
    _stop_runs_on_sigterm(settings)
    app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
    if settings.auth:  # gradio leaves a few routes open; the wall closes them (see ui/login.py)
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(LoginWall)]
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        auth=settings.auth,
        max_file_size=settings.max_upload,
        footer_links=["api", "gradio"],
        # Run history would keep every call's inputs in the browser, the Hub token included.
        run_history=False,
        # Never an MCP server (GRADIO_MCP_SERVER would turn one on): a second way in, not behind the login.
        mcp_server=False,
        app_kwargs=app_kwargs,
        state_session_capacity=settings.max_sessions,
        **kwargs,
    )


def _stop_runs_on_sigterm(settings: AppSettings) -> None:
    """A Space restart or `docker stop` sends SIGTERM: each running run saves a checkpoint of
    the step in flight and ends `stopped` (resumable) before the app exits."""
    import signal
    import threading

    from lora_studio.runner import Runner

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread (tests may launch from another)

    def on_term(signum: int, frame: object) -> None:
        stopped = Runner(settings.runs_dir).shutdown(timeout=settings.stop_grace)
        print(f"SIGTERM: stopped {len(stopped)} run(s) with a checkpoint; exiting", flush=True)
        raise KeyboardInterrupt  # gradio's launch loop closes the server on it

    signal.signal(signal.SIGTERM, on_term)
