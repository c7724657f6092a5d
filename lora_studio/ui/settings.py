"""How the app is deployed: read from environment variables (a Space sets them in its
settings) or from `app.py` flags, so one image serves a laptop, a Space and a private server."""

from __future__ import annotations

import math
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
    """Largest file a visitor may upload (`LORA_STUDIO_MAX_UPLOAD`, gradio's size syntax). Unset: the
    data size limit `LORA_STUDIO_MAX_UPLOAD_MB` where that is set (one knob for both), else 200 MB."""
    host: str = "0.0.0.0"
    """Interface to listen on (`GRADIO_SERVER_NAME`)."""
    port: int = 7860
    """Port to listen on (`GRADIO_SERVER_PORT`); Spaces expect 7860."""
    local_models: bool = True
    """Whether visitors may name a model folder on the server in the Base model box
    (`LORA_STUDIO_LOCAL_MODELS`: 1/true/yes/on or 0/false/no/off). Off: only `bundled`, Hub ids
    and the operator's own `model` above, so a public page cannot train on (or export the merged
    weights of) any model folder the server holds. Unset: on, except on a Hugging Face Space
    (`SPACE_ID` set)."""
    max_sessions: int = 200
    """Visitor sessions whose server-side state is kept (`LORA_STUDIO_MAX_SESSIONS`); the least
    recently active is dropped beyond it. Gradio keeps each session (about 0.4 MiB here) until this
    cap, 10 000 by default: on a public Space that is gigabytes (see docs/reliability.md)."""
    stop_grace: float = 25.0
    """Seconds the app waits, on SIGTERM, for running runs to save a checkpoint and exit
    (`LORA_STUDIO_STOP_GRACE`); keep it under the platform's kill timeout."""

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
            max_upload=env.get("LORA_STUDIO_MAX_UPLOAD") or _upload_limit(env.get("LORA_STUDIO_MAX_UPLOAD_MB")),
            host=env.get("GRADIO_SERVER_NAME") or "0.0.0.0",
            port=int(env.get("GRADIO_SERVER_PORT") or 7860),
            local_models=_local_models(env),
            max_sessions=int(env.get("LORA_STUDIO_MAX_SESSIONS") or 200),
            stop_grace=float(env.get("LORA_STUDIO_STOP_GRACE") or 25.0),
        )


LOCAL_MODELS_ENV = "LORA_STUDIO_LOCAL_MODELS"


def _local_models(env: dict[str, str]) -> bool:
    """LORA_STUDIO_LOCAL_MODELS as a bool; unset or empty: off on a Space (SPACE_ID), on elsewhere."""
    value = (env.get(LOCAL_MODELS_ENV) or "").strip().lower()
    if not value:
        return not env.get("SPACE_ID")
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{LOCAL_MODELS_ENV} must be 1/true/yes/on or 0/false/no/off (got {env[LOCAL_MODELS_ENV]!r})")


def _upload_limit(data_mb: str | None) -> str:
    """Gradio's upload limit from the data size limit in MB (0 or unset: 200 MB)."""
    try:
        mb = float(data_mb or 0)
    except ValueError:
        mb = 0.0
    return f"{max(1, math.ceil(mb * 1024))}kb" if mb > 0 else "200mb"


def default_model() -> str:
    from lora_studio import models

    try:
        models.bundled_gguf_dir()
    except FileNotFoundError:
        return models.BUNDLED_HUB_ID
    return models.BUNDLED
