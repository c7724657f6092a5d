"""How the app is deployed: read from environment variables (a Space sets them in its
settings) or from `app.py` flags, so one image serves a laptop, a Space and a private server."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class AppSettings:
    runs_dir: Path = Path("runs")
    """Where run folders live (`LORA_STUDIO_RUNS_DIR`); on a Space, point it at /data for persistent storage."""
    model: str = "bundled"
    """Model preselected in the Train tab (`LORA_STUDIO_MODEL`): `bundled`, a Hub id or a local folder.
    Unset: the bundled SmolLM2, or the same model from the Hub where the bundle is not installed
    (a Gradio-SDK Space installs requirements.txt only)."""
    auth: tuple[str, str] | None = None
    """Login for a private deployment (`LORA_STUDIO_USER` and `LORA_STUDIO_PASSWORD`); None: open."""
    max_upload: str = "200mb"
    """Largest file a visitor may upload (`LORA_STUDIO_MAX_UPLOAD`, gradio's size syntax)."""
    host: str = "0.0.0.0"
    """Interface to listen on (`GRADIO_SERVER_NAME`)."""
    port: int = 7860
    """Port to listen on (`GRADIO_SERVER_PORT`); Spaces expect 7860."""
    max_sessions: int = 200
    """Visitor sessions whose server-side state is kept (`LORA_STUDIO_MAX_SESSIONS`); the least
    recently active is dropped beyond it. Gradio keeps each session (about 0.4 MiB here) until this
    cap, 10 000 by default: on a public Space that is gigabytes (see docs/reliability.md)."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "AppSettings":
        env = dict(os.environ if env is None else env)
        user, password = env.get("LORA_STUDIO_USER"), env.get("LORA_STUDIO_PASSWORD")
        if bool(user) != bool(password):
            raise ValueError("set both LORA_STUDIO_USER and LORA_STUDIO_PASSWORD for a login, or neither")
        return cls(
            runs_dir=Path(env.get("LORA_STUDIO_RUNS_DIR") or "runs"),
            model=env.get("LORA_STUDIO_MODEL") or default_model(),
            auth=(user, password) if user and password else None,
            max_upload=env.get("LORA_STUDIO_MAX_UPLOAD") or "200mb",
            host=env.get("GRADIO_SERVER_NAME") or "0.0.0.0",
            port=int(env.get("GRADIO_SERVER_PORT") or 7860),
            max_sessions=int(env.get("LORA_STUDIO_MAX_SESSIONS") or 200),
        )


def default_model() -> str:
    from lora_studio import models

    try:
        models.bundled_gguf_dir()
    except FileNotFoundError:
        return models.BUNDLED_HUB_ID
    return models.BUNDLED
