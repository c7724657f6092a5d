"""Who is calling: every handler asks `Identities.caller(request)` and acts only on that
caller's runs (see Studio.run_dir).

- Local mode: one person, the operator: every caller is `local` and sees everything.
- Signed in with Hugging Face (public mode on a Space with `hf_oauth: true`): `hf:<username>`.
- A password login (LORA_STUDIO_USER): `user:<name>`.
- Anyone else: an anonymous id, `anon-<random>`, made by the server. The browser keeps it in
  localStorage (gr.BrowserState) as `<id>.<HMAC>` and hands it back on each page load, so it
  survives a reload; the server checks the HMAC with its own key, so a visitor cannot claim
  another id by naming it. An API client (gradio_client) that never loads the page gets a fresh
  id for its session.

Admins (LORA_STUDIO_ADMINS) see every run, like the operator in local mode.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_studio.ui.settings import AppSettings

LOCAL_OWNER = "local"
SESSIONS_KEPT = 20_000  # session -> owner bindings kept (a few dozen bytes each)
SECRET_FILE = ".owner-key"


@dataclass(frozen=True)
class Caller:
    owner: str
    """Recorded in the folder of every run this caller starts (RUN/owner.json)."""
    admin: bool = False
    """Sees and manages every run."""
    hub_user: str | None = None
    """The Hugging Face account signed in with, if any."""
    hub_token: str | None = None
    """That account's OAuth token: used for this caller's own requests, never written anywhere."""

    def __repr__(self) -> str:  # never print the token
        return f"Caller(owner={self.owner!r}, admin={self.admin}, hub_user={self.hub_user!r})"

    def owns(self, owner: str | None) -> bool:
        return self.admin or (owner is not None and hmac.compare_digest(owner, self.owner))


def load_key(settings: AppSettings) -> bytes:
    """The HMAC key: LORA_STUDIO_SECRET, else a random one kept (0600) in the runs folder so
    visitors' ids survive a restart of the app."""
    if settings.secret:
        return settings.secret.encode()
    path = Path(settings.runs_dir) / SECRET_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        pass
    key = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex())
    try:
        os.link(tmp, path)  # first writer wins: two app processes agree on one key
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())


class Identities:
    """Owner ids of the app's sessions (one per app process)."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self._key = load_key(settings) if settings.public else b""
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------ anonymous ids

    def sign(self, owner: str) -> str:
        mac = hmac.new(self._key, owner.encode(), hashlib.sha256).hexdigest()
        return f"{owner}.{mac}"

    def verify(self, token: Any) -> str | None:
        """The anonymous id in a signed token, or None when it is not one this server made."""
        if not isinstance(token, str) or token.count(".") != 1:
            return None
        owner, mac = token.split(".")
        if not owner.startswith("anon-") or not self._key:
            return None
        good = hmac.new(self._key, owner.encode(), hashlib.sha256).hexdigest()
        return owner if hmac.compare_digest(mac, good) else None

    def _bound(self, session: str | None) -> str | None:
        if not session:
            return None
        with self._lock:
            owner = self._sessions.get(session)
            if owner:
                self._sessions.move_to_end(session)
            return owner

    def _bind(self, session: str | None, owner: str) -> None:
        if not session:
            return
        with self._lock:
            self._sessions[session] = owner
            self._sessions.move_to_end(session)
            while len(self._sessions) > SESSIONS_KEPT:
                self._sessions.popitem(last=False)

    def identify(self, token: Any, request: Any) -> str:
        """On page load: the browser's stored token (or nothing). Binds this session to the
        token's id when the signature holds, else to a new id; returns the token to store."""
        if not self.settings.public:
            return token if isinstance(token, str) else ""
        owner = self.verify(token) or self._bound(getattr(request, "session_hash", None)) or new_anonymous()
        self._bind(getattr(request, "session_hash", None), owner)
        return self.sign(owner)

    # ------------------------------------------------ the caller

    def caller(self, request: Any) -> Caller:
        """Who sent `request` (a gr.Request; None: a call from inside the app, e.g. a test)."""
        if not self.settings.public:
            return Caller(LOCAL_OWNER, admin=True)
        info = oauth_info(request) if self.settings.oauth else None
        if info:
            user = (info.get("userinfo") or {}).get("preferred_username")
            if user:
                return Caller(f"hf:{user}", admin=user in self.settings.admins, hub_user=user,
                              hub_token=info.get("access_token"))
        login = getattr(request, "username", None) if request is not None else None
        if login:
            return Caller(f"user:{login}", admin=login in self.settings.admins)
        session = getattr(request, "session_hash", None) if request is not None else None
        owner = self._bound(session)
        if owner is None:
            owner = new_anonymous()
            self._bind(session, owner)
        return Caller(owner)


def new_anonymous() -> str:
    return f"anon-{secrets.token_hex(12)}"


def oauth_info(request: Any) -> dict[str, Any] | None:
    """The signed-in Hugging Face session of a request (gradio's OAuth), if any and not expired."""
    raw = getattr(request, "request", None) if request is not None else None
    if raw is None:
        return None
    try:
        session = raw.session  # starlette: an AssertionError without the session middleware
    except (AssertionError, AttributeError):
        return None
    from gradio.oauth import _get_valid_oauth_info_from_session

    return _get_valid_oauth_info_from_session(session)
