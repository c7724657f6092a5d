"""What every tab shares: the Studio context (settings, chat engine, runner), run lookup
and small conversions between gradio values and plain Python."""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import shutil
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from lora_studio import runfiles as rf
from lora_studio.chat import ChatEngine
from lora_studio.runner import Runner
from lora_studio.ui.identity import Caller, Identities
from lora_studio.ui.settings import LOCAL_MODELS_ENV, AppSettings

POLL_EVERY_S = 3.0  # the runner's poll (a read of every run) from open pages, at most this often in all
TOKENIZERS_KEPT = 8  # preview tokenizers kept in memory (a few MB each), least recently used dropped first


@dataclass
class Studio:
    """One per app process: shared by every visitor's session."""

    settings: AppSettings
    chat: ChatEngine = field(default_factory=ChatEngine)
    runner: Runner = field(init=False)
    identities: Identities = field(init=False)
    _tokenizers: OrderedDict[str, Any] = field(default_factory=OrderedDict, init=False)
    _tok_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _polled: float = field(default=0.0, init=False)
    _poll_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _identified: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.runner = Runner(self.settings.runs_dir)
        self.identities = Identities(self.settings)

    @property
    def runs_dir(self) -> Path:
        return self.settings.runs_dir

    def poll(self) -> None:
        """The runner's poll (launch a queued run, mark a dead one), at most every POLL_EVERY_S
        whatever the number of open pages: each page's tick then costs one small read, its own run's
        status. The supervisors launch queued runs themselves; this only covers a killed one."""
        with self._poll_lock:
            now = time.monotonic()
            if now - self._polled < POLL_EVERY_S:
                return
            self._polled = now
        self.runner.poll()

    def after_identify(self, fn: Callable, inputs: Any, outputs: Any, **kwargs: Any) -> Any:
        """Run `fn` on page load once the visitor is known (ui/app.py sets the identify event):
        what a page shows on load (its runs, its running run) depends on who is looking."""
        return self._identified.then(fn, inputs, outputs, **kwargs)

    def caller(self, request: gr.Request | None) -> Caller:
        """Who is calling (see ui/identity.py); every handler that touches a run asks this first."""
        return self.identities.caller(request)

    def run_dir(self, run_id: str | None, caller: Caller, need_adapter: bool = False) -> Path:
        """The folder of a run picked in a dropdown, refusing ids that could leave the runs folder.
        Another visitor's run gets the very answer a run that does not exist gets."""
        if not run_id:
            raise gr.Error("Pick a run first (train one in the Train tab).")
        if not rf.valid_run_id(run_id):
            raise gr.Error(f"{run_id!r} is not a run id")
        path = self.runs_dir / run_id
        exists = (path / "config.json").exists() or (path / "status.json").exists()
        if not exists or not self.owns(caller, run_id):
            raise gr.Error(f"run {run_id} not found")
        if need_adapter and not rf.has_adapter(path):
            raise gr.Error(f"run {run_id} has no saved adapter yet (it is saved when training ends or stops)")
        return path

    def owns(self, caller: Caller, run_id: str) -> bool:
        return caller.admin or caller.owns(rf.read_owner(self.runs_dir / run_id))

    def check_run(self, run_id: str | None, caller: Caller) -> str:
        """`run_id` when the caller may act on it (ValueError otherwise, worded as for a missing run)."""
        try:
            self.run_dir(run_id, caller)
        except gr.Error as e:
            raise ValueError(e.message) from None
        return run_id  # type: ignore[return-value]

    def list_runs(self, caller: Caller) -> list[dict[str, Any]]:
        """The runner's list_runs(), only the caller's own runs (every run for an admin)."""
        return [s for s in self.runner.list_runs() if self.owns(caller, s["run_id"])]

    def runs(self, caller: Caller, need_adapter: bool = False) -> list[tuple[str, str]]:
        """(label, run id) of the caller's runs, newest first (as the runner sees them: a dead worker is failed)."""
        choices = []
        for status in self.list_runs(caller):
            run_id = status["run_id"]
            if need_adapter and not rf.has_adapter(self.runs_dir / run_id):
                continue
            choices.append((run_label(status), run_id))
        return choices

    def tokenizer(self, model: str) -> Any:
        """The model's tokenizer (for previews), kept for the TOKENIZERS_KEPT models used last:
        every visitor may type model names, and an unbounded cache would keep each one forever."""
        from lora_studio.models import load_tokenizer

        with self._tok_lock:
            if model in self._tokenizers:
                self._tokenizers.move_to_end(model)
            else:
                self._tokenizers[model] = load_tokenizer(model)
                while len(self._tokenizers) > TOKENIZERS_KEPT:
                    self._tokenizers.popitem(last=False)
            return self._tokenizers[model]

    def check_model(self, spec: str | None) -> None:
        """Refuse a model folder on the server in the Base model box where local models are off
        (`AppSettings.local_models`): only `bundled`, a Hub id (owner/name) that names no existing
        path here (transformers would load that path first) and the operator's own model pass.
        One message whatever the reason, so the refusal tells nothing about the server's files."""
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        from lora_studio.models import BUNDLED

        spec = (spec or "").strip()
        if self.settings.local_models or spec in (BUNDLED, self.settings.model.strip()):
            return
        try:
            validate_repo_id(spec)
            hub_id = not (Path(spec).exists() or Path(spec).is_symlink())
        except (HFValidationError, OSError):
            hub_id = False
        if not hub_id:
            raise ValueError(
                f"Base model {spec!r}: this server takes the bundled model or a Hub id (owner/name), "
                f"not a folder on the server ({LOCAL_MODELS_ENV} is off)"
            )

    def keep_upload(self, temp_path: str, original_name: str | None = None) -> Path:
        """Copy an uploaded file into RUNS/.uploads under a name from its content, so a run's
        config points at a file that outlives gradio's temporary cache (and sits on the same
        persistent storage as the runs). `.uploads` can never be taken for a run id.

        The visitor's file name is only a label: it is reduced to one safe path component
        (see `safe_upload_name`), and a file over the data size limit is refused before a
        byte of it is copied."""
        from lora_studio.data.sources import MAX_MB_ENV, max_file_mb

        source = Path(temp_path)
        shown = Path(str(original_name or temp_path).replace("\\", "/")).name or "data"
        size = source.stat().st_size
        limit = max_file_mb()
        if limit > 0 and size > limit * 2**20:
            raise ValueError(f"{shown}: the file is {size / 2**20:.1f} MB, over the {limit:g} MB limit ({MAX_MB_ENV})")
        digest = hashlib.sha256()
        with source.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        folder = self.runs_dir / ".uploads"
        if folder.is_symlink():
            raise ValueError(f"{folder} is a link; uploads are only stored inside the runs folder")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{digest.hexdigest()[:12]}-{safe_upload_name(shown)}"
        if target.resolve().parent != folder.resolve():  # cannot happen with a safe name; never write outside
            raise ValueError(f"{shown!r} is not a usable file name")
        if not target.exists():
            tmp = folder / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"  # unique: two visitors may upload the same file
            try:
                shutil.copyfile(source, tmp)
                tmp.replace(target)
            finally:
                tmp.unlink(missing_ok=True)
        return target


UPLOAD_NAME_BYTES = 120  # with the digest, far below the 255-byte limit of common file systems


def safe_upload_name(name: str) -> str:
    """One path component made from a visitor's file name: letters and digits of any script,
    `.`, `-` and `_` kept, everything else (separators, NUL, newlines, spaces) turned into `_`,
    no leading dot, at most UPLOAD_NAME_BYTES of UTF-8 with the end (the extension) kept."""
    name = unicodedata.normalize("NFC", name.replace("\\", "/")).rsplit("/", 1)[-1]
    name = re.sub(r"[^\w.-]+", "_", name).lstrip("._")
    while len(name.encode("utf-8")) > UPLOAD_NAME_BYTES:
        name = name[1:]
    name = name.lstrip("._")
    return name if name and name not in (".", "..") else "data"


def run_label(status: dict[str, Any]) -> str:
    parts = [status["run_id"]]
    if status.get("method"):
        parts.append(status["method"])
    if status.get("state"):
        parts.append(f"{status['state']} at step {status.get('step', 0)}")
    return " · ".join(parts)


def message_text(content: Any) -> str:
    """A chat message's text, whatever shape gradio hands it in (str, parts, dict)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def plain_messages(history: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """Chatbot value -> [{"role", "content": str}] for the chat template."""
    return [{"role": m["role"], "content": message_text(m.get("content"))} for m in history or []]


def dropdown_update(choices: list[tuple[str, str]], current: str | None) -> dict[str, Any]:
    """Refresh a run dropdown, keeping the current pick when it still exists."""
    ids = [value for _, value in choices]
    value = current if current in ids else (ids[0] if ids else None)
    return gr.update(choices=choices, value=value)


USER_ERRORS = (ValueError, OSError, TimeoutError, KeyError)  # OSError: a model or file that cannot be read


def friendly(fn: Callable) -> Callable:
    """Show the user's own mistakes (bad file, missing run, busy model) as a message on the
    page instead of gradio's bare "Error"; anything else is a bug and stays an error."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except USER_ERRORS as e:
                raise gr.Error(str(e)) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None

    return wrapper


def run_picker(studio: Studio, tab: gr.Tab, elem_id: str, api_name: str | None = None) -> gr.Dropdown:
    """A dropdown of the caller's runs that have an adapter, with a refresh button; refreshed when
    its tab is opened too (a run that just finished shows up without a reload). Empty when the
    page is built: filled on load with the visitor's own runs."""
    with gr.Row():
        run = gr.Dropdown(label="Run", choices=[], elem_id=elem_id, scale=4, allow_custom_value=True)
        refresh = gr.Button("Refresh runs", size="sm", scale=1)

    def update(current: str | None, request: gr.Request) -> dict[str, Any]:
        return dropdown_update(studio.runs(studio.caller(request), need_adapter=True), current)

    visibility = {"api_name": api_name} if api_name else {"api_visibility": "undocumented"}
    refresh.click(update, run, run, queue=False, **visibility)
    tab.select(update, run, run, queue=False, api_visibility="undocumented")
    return run
