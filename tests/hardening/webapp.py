"""Helpers for the web-app hardening tests (test_app_*.py): the real `python app.py` launched by
tests/ui/conftest.launch_app, driven with gradio_client and with raw HTTP where a browser-free
attacker would not use the client."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
from gradio_client import Client, handle_file

from tests.ui.conftest import ROOT, LaunchedApp
from tests.ui.test_api_train import settings  # noqa: F401 - re-exported: the /start widget order

EXAMPLE = ROOT / "examples" / "json_answers.jsonl"


def inspect(client: Client, path: str | Path | None, model: str, hub: str = "", max_len: int = 128) -> tuple:
    """The Data tab's /inspect_data: (summary, problems, first rows, samples, histogram)."""
    file = handle_file(str(path)) if path is not None else None
    return client.predict(file, None, hub, "auto", "", "", model, max_len, api_name="/inspect_data")


def problems_of(frame: dict[str, Any]) -> list[dict[str, Any]]:
    """The problems Dataframe as records (file, row, field, kind, severity, message)."""
    return [dict(zip(frame["headers"], row)) for row in frame["data"] if any(v not in (None, "") for v in row)]


def run_folders(runs_dir: Path) -> set[str]:
    return {p.name for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")} if runs_dir.exists() else set()


def tree(folder: Path) -> dict[str, float]:
    """Every path under `folder` with its modification time (what a test may compare before/after)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            try:
                found[str(path)] = path.lstat().st_mtime
            except FileNotFoundError:  # removed while walking (a run's temporary file)
                pass
    return found


def fn_index(app: LaunchedApp, api_name: str, cookies: httpx.Cookies | None = None) -> int:
    config = httpx.get(app.url + "config", cookies=cookies, timeout=10).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def raw_call(app: LaunchedApp, fn: int, data: list[Any], session_hash: str, timeout: float = 60) -> dict[str, Any]:
    """One event through /gradio_api/queue/join with a body the client would refuse to build
    (NaN, a crafted FileData), in an existing session; returns the process_completed message."""
    body = json.dumps({"data": data, "fn_index": fn, "session_hash": session_hash, "trigger_id": None, "event_data": None})
    joined = httpx.post(app.url + "gradio_api/queue/join", content=body, headers={"content-type": "application/json"}, timeout=10)
    joined.raise_for_status()
    event_id = joined.json()["event_id"]
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", app.url + f"gradio_api/queue/data?session_hash={session_hash}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed" and msg.get("event_id") == event_id:
                    return msg
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"no answer to event {event_id} within {timeout} s")


def assert_serving(app: LaunchedApp, client: Client, model: str) -> None:
    """The app process is alive and still answers a good call correctly."""
    assert app.process.poll() is None, f"app.py exited:\n{app.log_text()[-3000:]}"
    summary, *_ = inspect(client, EXAMPLE, model)
    assert "ready to train" in summary and "241 rows" in summary
