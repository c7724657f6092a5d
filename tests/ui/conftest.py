"""The app launched as a user launches it (`python app.py`), on a tiny model folder and a
temporary runs folder, plus a finished run to chat with and export."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import format_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LaunchedApp:
    url: str
    runs_dir: Path
    process: subprocess.Popen
    log: Path
    auth: tuple[str, str] | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(runs_dir: Path, model: str, log: Path, extra_env: dict[str, str] | None = None) -> LaunchedApp:
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "LORA_STUDIO_MODE", "SPACE_ID")}
    env = {
        **base,
        "LORA_STUDIO_RUNS_DIR": str(runs_dir),
        "LORA_STUDIO_MODEL": model,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),  # a test may plant an HF_TOKEN here (tests/hardening/test_app_public.py)
    }
    fh = log.open("w")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "gradio_api/info", timeout=2) as response:
                if response.status in (200, 401):
                    break
        except urllib.error.HTTPError as e:
            if e.code == 401:  # login required: the server is up
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        process.kill()
        raise RuntimeError(f"app.py did not answer within 120 s:\n{log.read_text()}")
    user, password = (extra_env or {}).get("LORA_STUDIO_USER"), (extra_env or {}).get("LORA_STUDIO_PASSWORD")
    return LaunchedApp(url, runs_dir, process, log, (user, password) if user else None)


def stop_app(app: LaunchedApp) -> None:
    app.process.terminate()
    try:
        app.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        app.process.kill()
        app.process.wait(timeout=20)


def train_tiny_run(runs_dir: Path, model_dir: str, run_id: str = "tiny-done", steps: int = 8) -> Path:
    """A finished run made by the engine itself (not the UI), so Compare and Export have an adapter."""
    from lora_studio.config import TrainConfig
    from lora_studio.engine.run import train

    data = write_jsonl(runs_dir.parent / f"{run_id}.jsonl", format_rows(16))
    cfg = TrainConfig(
        data=str(data), out=str(runs_dir / run_id), model=model_dir, rank=4, lr=1e-2, batch_size=4, max_steps=steps
    )
    status = train(cfg)
    assert status["state"] == "done", status
    return runs_dir / run_id


@pytest.fixture(scope="session")
def ui_runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui") / "runs"


@pytest.fixture(scope="session")
def done_run(ui_runs_dir, tiny_llama_dir) -> Path:
    ui_runs_dir.mkdir(parents=True, exist_ok=True)
    return train_tiny_run(ui_runs_dir, tiny_llama_dir)


@pytest.fixture(scope="session")
def app(ui_runs_dir, tiny_llama_dir, done_run, tmp_path_factory):
    launched = launch_app(ui_runs_dir, tiny_llama_dir, tmp_path_factory.mktemp("logs") / "app.log")
    yield launched
    stop_app(launched)


@pytest.fixture(scope="session")
def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)
