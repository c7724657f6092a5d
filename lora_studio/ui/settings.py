"""How the app is deployed: read from environment variables (a Space sets them in its
settings) or from `app.py` flags, so one image serves a laptop, a Space and a private server."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

MODE_ENV = "LORA_STUDIO_MODE"
LOCAL, PUBLIC = "local", "public"
REMOTE_CODE_ENV = "LORA_STUDIO_ALLOW_REMOTE_CODE"
ADMINS_ENV = "LORA_STUDIO_ADMINS"


@dataclass
class Limits:
    """Fair-share caps of a public deployment, one environment variable each (0: no cap).
    Local mode has none: the operator may use the whole machine."""

    runs_per_visitor: int = 1
    """Queued-or-running runs one visitor may have (`LORA_STUDIO_MAX_RUNS_PER_VISITOR`)."""
    queue: int = 20
    """Runs queued or running on the machine, all visitors together (`LORA_STUDIO_MAX_QUEUE`)."""
    steps: int = 2000
    """Optimizer steps per run (`LORA_STUDIO_MAX_STEPS`); a run by epochs is cut there."""
    epochs: float = 5.0
    """Epochs per run (`LORA_STUDIO_MAX_EPOCHS`)."""
    seq_len: int = 1024
    """Max length in tokens (`LORA_STUDIO_MAX_SEQ_LEN`)."""
    wall_s: float = 3600.0
    """Seconds of training per run (`LORA_STUDIO_MAX_WALL_S`): then it is stopped with a checkpoint."""
    hub_rows: int = 100_000
    """Rows read from a Hub dataset (`LORA_STUDIO_MAX_HUB_ROWS`): more is refused."""
    hub_mb: float = 200.0
    """Megabytes read from a Hub dataset (`LORA_STUDIO_MAX_HUB_MB`): more is refused."""
    prompt_chars: int = 4000
    """Characters of one chat or batch prompt (`LORA_STUDIO_MAX_PROMPT_CHARS`)."""
    new_tokens: int = 256
    """Max new tokens of one reply (`LORA_STUDIO_MAX_NEW_TOKENS`)."""
    batch_prompts: int = 50
    """Prompts one batch comparison answers (`LORA_STUDIO_MAX_BATCH_PROMPTS`)."""
    keep_days: float = 7.0
    """Days an anonymous visitor's finished run is kept (`LORA_STUDIO_KEEP_DAYS`); merged
    exports and gradio's cache are cleaned on the same schedule."""

    ENV = {
        "runs_per_visitor": "LORA_STUDIO_MAX_RUNS_PER_VISITOR", "queue": "LORA_STUDIO_MAX_QUEUE",
        "steps": "LORA_STUDIO_MAX_STEPS", "epochs": "LORA_STUDIO_MAX_EPOCHS", "seq_len": "LORA_STUDIO_MAX_SEQ_LEN",
        "wall_s": "LORA_STUDIO_MAX_WALL_S", "hub_rows": "LORA_STUDIO_MAX_HUB_ROWS", "hub_mb": "LORA_STUDIO_MAX_HUB_MB",
        "prompt_chars": "LORA_STUDIO_MAX_PROMPT_CHARS", "new_tokens": "LORA_STUDIO_MAX_NEW_TOKENS",
        "batch_prompts": "LORA_STUDIO_MAX_BATCH_PROMPTS", "keep_days": "LORA_STUDIO_KEEP_DAYS",
    }  # fmt: skip

    @classmethod
    def none(cls) -> "Limits":
        return cls(**{name: 0 for name in cls.ENV})

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "Limits":
        limits = cls()
        for name, var in cls.ENV.items():
            text = (env.get(var) or "").strip()
            if not text:
                continue
            kind = type(getattr(limits, name))
            try:
                value = kind(float(text)) if kind is int else float(text)
            except ValueError:
                raise ValueError(f"{var} must be a number (got {text!r})") from None
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"{var} must be 0 (no cap) or more (got {text!r})")
            setattr(limits, name, value)
        return limits


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
    host: str = "127.0.0.1"
    """Interface to listen on (`GRADIO_SERVER_NAME`, `app.py --host`). Unset: 127.0.0.1 in local
    mode (this machine only), 0.0.0.0 in public mode (a Space or a container)."""
    port: int = 7860
    """Port to listen on (`GRADIO_SERVER_PORT`); Spaces expect 7860."""
    local_models: bool = True
    """Whether visitors may name a model folder on the server in the Base model box
    (`LORA_STUDIO_LOCAL_MODELS`: 1/true/yes/on or 0/false/no/off). Off: only `bundled`, Hub ids
    and the operator's own `model` above, so a public page cannot train on (or export the merged
    weights of) any model folder the server holds. Unset: on, except in public mode or on a Space
    (`SPACE_ID` set)."""
    max_sessions: int = 200
    """Visitor sessions whose server-side state is kept (`LORA_STUDIO_MAX_SESSIONS`); the least
    recently active is dropped beyond it. Gradio keeps each session (about 0.4 MiB here) until this
    cap, 10 000 by default: on a public Space that is gigabytes (see docs/reliability.md)."""
    stop_grace: float = 25.0
    """Seconds the app waits, on SIGTERM, for running runs to save a checkpoint and exit
    (`LORA_STUDIO_STOP_GRACE`); keep it under the platform's kill timeout."""

    mode: str = LOCAL
    """`local`: one person, the operator, on their own machine: every run is theirs, their own
    `HF_TOKEN` works, no limits. `public`: many anonymous visitors (a Space): each owns their runs,
    nobody uses the server's token, remote code is never offered, fair-share limits hold.
    `LORA_STUDIO_MODE` or `app.py --mode`; unset: public where `SPACE_ID` is set, else local."""
    admins: frozenset[str] = frozenset()
    """Hub accounts (or login names) that see and manage every run in public mode
    (`LORA_STUDIO_ADMINS`, comma-separated)."""
    allow_remote_code: bool = False
    """Whether "trust remote code" may be used (`LORA_STUDIO_ALLOW_REMOTE_CODE=1`); never in public mode."""
    oauth: bool = False
    """"Sign in with Hugging Face": on a Space whose front matter has `hf_oauth: true` (the Space
    then sets OAUTH_CLIENT_ID). Never elsewhere: gradio's local stand-in logs in with the
    machine's own token."""
    limits: Limits = field(default_factory=Limits.none)
    """Fair-share caps; public mode reads them from the environment (see Limits), local mode has none."""
    secret: str | None = field(default=None, repr=False)
    """Key that signs anonymous visitors' ids (`LORA_STUDIO_SECRET`); unset: one kept in the runs folder."""

    @property
    def public(self) -> bool:
        return self.mode == PUBLIC

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, mode: str | None = None) -> "AppSettings":
        env = dict(os.environ if env is None else env)
        user, password = env.get("LORA_STUDIO_USER"), env.get("LORA_STUDIO_PASSWORD")
        if bool(user) != bool(password):
            raise ValueError("set both LORA_STUDIO_USER and LORA_STUDIO_PASSWORD for a login, or neither")
        mode = resolve_mode(mode or env.get(MODE_ENV), env)
        public = mode == PUBLIC
        remote_code = _flag(env, REMOTE_CODE_ENV, False)
        if public and remote_code:
            raise ValueError(f"{REMOTE_CODE_ENV}=1 is refused in public mode: visitors' models would run code here")
        return cls(
            runs_dir=Path(env.get("LORA_STUDIO_RUNS_DIR") or "runs"),
            model=env.get("LORA_STUDIO_MODEL") or default_model(),
            auth=(user, password) if user and password else None,
            max_upload=env.get("LORA_STUDIO_MAX_UPLOAD") or _upload_limit(env.get("LORA_STUDIO_MAX_UPLOAD_MB")),
            host=env.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if public else "127.0.0.1"),
            port=int(env.get("GRADIO_SERVER_PORT") or 7860),
            local_models=_local_models(env, public),
            max_sessions=int(env.get("LORA_STUDIO_MAX_SESSIONS") or 200),
            stop_grace=float(env.get("LORA_STUDIO_STOP_GRACE") or 25.0),
            mode=mode,
            admins=frozenset(a.strip() for a in (env.get(ADMINS_ENV) or "").split(",") if a.strip()),
            allow_remote_code=remote_code,
            oauth=public and bool(env.get("SPACE_ID")) and env.get("SYSTEM") == "spaces" and bool(env.get("OAUTH_CLIENT_ID")),
            limits=Limits.from_env(env) if public else Limits.none(),
            secret=env.get("LORA_STUDIO_SECRET") or None,
        )


def resolve_mode(value: str | None, env: dict[str, str]) -> str:
    """`local` or `public` from a flag or LORA_STUDIO_MODE; unset: public on a Space (SPACE_ID)."""
    text = (value or "").strip().lower()
    if not text:
        return PUBLIC if env.get("SPACE_ID") else LOCAL
    if text not in (LOCAL, PUBLIC):
        raise ValueError(f"{MODE_ENV} must be local or public (got {value!r})")
    return text


def _flag(env: dict[str, str], name: str, default: bool) -> bool:
    value = (env.get(name) or "").strip().lower()
    if not value:
        return default
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name} must be 1/true/yes/on or 0/false/no/off (got {env[name]!r})")


LOCAL_MODELS_ENV = "LORA_STUDIO_LOCAL_MODELS"


def _local_models(env: dict[str, str], public: bool = False) -> bool:
    """LORA_STUDIO_LOCAL_MODELS as a bool; unset or empty: off on a Space (SPACE_ID) or in public
    mode, on elsewhere."""
    return _flag(env, LOCAL_MODELS_ENV, not (env.get("SPACE_ID") or public))


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
