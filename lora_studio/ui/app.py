"""The page: a header and one tab per step of the journey (Data, Train, Runs, Compare, Export).

Public mode (ui/settings.py): the visitor is identified on page load before anything of theirs is
shown (ui/identity.py), "Sign in with Hugging Face" is offered on a Space with OAuth, the
server's own Hub token is removed from the app's environment at launch, and gradio's cache and
old anonymous runs are cleaned (ui/cleanup.py)."""

from __future__ import annotations

import os
import sys

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

OWNER_KEY = "lora-studio-owner"  # the browser's localStorage key of the signed anonymous id


def build_app(settings: AppSettings | None = None) -> gr.Blocks:
    settings = settings or AppSettings.from_env()
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    studio = Studio(settings)
    keep_s = int(settings.limits.keep_days * 86400) if settings.public else 0
    # Gradio's cache (uploads, zips, CSVs) cleaned every hour of files older than a day, in public mode.
    delete_cache = (3600, min(keep_s, 86400) or 86400) if settings.public else None
    with gr.Blocks(title="LoRA Studio", delete_cache=delete_cache) as demo:
        gr.Markdown(
            "# LoRA Studio\nFine-tune a language model from your browser: "
            "**Data** → **Train** → **Runs** → **Compare** → **Export**."
        )
        if settings.public:
            gr.Markdown(
                "Public studio: your runs are yours alone"
                + (" (sign in to keep them across browsers)" if settings.oauth else " (kept for this browser)")
                + ". Nothing you do here uses the server's Hub account.",
                elem_id="public-note",
            )
        if settings.oauth:  # only on a Space with hf_oauth: gradio's local stand-in would log in as the machine
            gr.LoginButton(elem_id="hf-login")
        # The anonymous id, signed by the server, kept by the browser across reloads.
        owner_key = gr.BrowserState(None, storage_key=OWNER_KEY)

        def identify(token, request: gr.Request):
            return studio.identities.identify(token, request)

        studio._identified = demo.load(identify, owner_key, owner_key, api_visibility="undocumented", queue=False)
        # Shown in the Train tab, read by the Data tab's preview too (template, truncation).
        model = gr.Dropdown(
            label="Base model: bundled, a Hub id" + (" or a local folder" if settings.local_models else ""),
            choices=list(dict.fromkeys([settings.model, BUNDLED])),
            value=settings.model,
            allow_custom_value=True,
            elem_id="model",
            render=False,
        )
        cap = settings.limits.seq_len  # the slider ends at this server's cap (public mode)
        max_len = gr.Slider(
            32, cap or 4096, value=min(512, cap or 512), step=32, elem_id="max-len", render=False,
            label=f"Max length (tokens; at most {cap} on this server)" if cap else "Max length (tokens)",
        )
        with gr.Tabs(elem_id="tabs"):
            selection = build_data_tab(studio, model, max_len)
            view = build_train_tab(studio, demo, selection, model, max_len)
            build_runs_tab(studio, demo, view, view.outputs)
            build_compare_tab(studio)
            build_export_tab(studio)
        run_pickers = [c for c in demo.blocks.values() if getattr(c, "elem_id", None) in ("compare-run", "export-run")]

        def fill_pickers(request: gr.Request, *current):  # the request first: gradio passes it by position
            choices = studio.runs(studio.caller(request), need_adapter=True)
            return [dropdown_update(choices, c) for c in current]

        studio.after_identify(fill_pickers, run_pickers, run_pickers, api_visibility="undocumented", queue=False)
        from lora_studio.ui.bakeoff_panel import start_background

        start_background(studio)  # bake-offs go on with no page open
        if settings.public and keep_s:
            from lora_studio.ui.cleanup import start_cleanup

            start_cleanup(studio, keep_s)
    demo.studio = studio  # type: ignore[attr-defined]  # for tests and app.py
    return demo


# Where huggingface_hub finds a token by itself: a public app removes them from its environment.
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "HUGGINGFACEHUB_API_TOKEN")


def seal_credentials() -> None:
    """Public mode: no request of a visitor may use the server's Hub token. Taken out of the
    environment, the token file ignored, and huggingface_hub told to send no token it was not
    handed; the training processes get an allow-listed environment (supervisor.worker_env)."""
    for name in TOKEN_VARS:
        os.environ.pop(name, None)
    os.environ.update(HF_HUB_DISABLE_IMPLICIT_TOKEN="1", HF_TOKEN_PATH=os.devnull, HF_STORED_TOKENS_PATH=os.devnull)
    from huggingface_hub import constants

    constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True
    constants.HF_TOKEN_PATH = os.devnull
    constants.HF_STORED_TOKENS_PATH = os.devnull


def announce(settings: AppSettings) -> str:
    """What becomes reachable, printed at start."""
    where = f"http://{settings.host}:{settings.port}"
    if settings.host in ("127.0.0.1", "localhost", "::1"):
        return f"LoRA Studio ({settings.mode} mode) on {where}: this machine only (--host 0.0.0.0 opens it to the network)."
    text = f"LoRA Studio ({settings.mode} mode) listens on {where}: reachable by anyone who can reach this machine."
    if not settings.public:
        text += (
            " Local mode: every visitor acts as the operator (all runs, the server's HF_TOKEN, no limits"
            + (", a login is required" if settings.auth else "")
            + "). To share it, use --mode public."
        )
    else:
        text += " Public mode: each visitor owns their runs; the server's token is never used for them."
    return text


def launch(settings: AppSettings, **kwargs) -> None:
    """Serve the app: queue on (one training start and one generation at a time), login if set."""
    os.environ["LORA_STUDIO_MODE"] = settings.mode  # read by the training processes and the model loader
    if settings.public:
        seal_credentials()
    print(announce(settings), file=sys.stderr, flush=True)
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
