"""The login wall: with a login set, every request needs it, except the few files the login
page itself is made of.

Gradio checks the login on its main routes (config, info, upload, queue, run, call, file) but
leaves others open (cancel, reset, stream, heartbeat, user, token, app_id, FastAPI's
/openapi.json ...) and writes its whole API description into the login page. The open routes
need an event or session id to do harm, but "the login protects every endpoint" should not rest
on ids being hard to guess. This ASGI middleware answers 401 to any request without a valid
login cookie unless its path is on a short allowlist (what the browser fetches before logging
in: the page, its theme and static assets, the login route), and empties the API description in
the page. It asks the same question as gradio's own `login_check` (is the session token in the
cookie one the app issued?) and refuses when it cannot tell (fails closed).
"""

from __future__ import annotations

import json
import re
from typing import Any, Awaitable, Callable

from starlette.requests import cookie_parser

# What the login page loads before the visitor is logged in (measured with a browser: `/`,
# `/theme.css`, `/assets/*`, `/static/*`, then POST `/login`), plus `startup-events`, which
# gradio's launch() calls itself, without a login, before serving (it runs the app's startup
# events once; later calls do nothing and return false).
PUBLIC_PATHS = frozenset(
    {"/", "/login", "/login/", "/logout", "/logout/", "/theme.css", "/favicon.ico", "/manifest.json", "/robots.txt",
     "/gradio_api/startup-events"}
)  # fmt: skip
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
DENIED = json.dumps({"detail": {"error": "Not authenticated", "auth_message": None}}).encode()

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# Gradio writes the whole API description into the page, login page included: endpoint names,
# parameters, example values, the choices of every dropdown (run ids). Emptied before login.
API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.S)
NO_API_INFO = b'window.gradio_api_info = {"named_endpoints":{},"unnamed_endpoints":{}};</script>'


def _without_api_info(send: Send) -> Send:
    """`send` for the page: the body collected, the API description emptied, the length fixed."""
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def capture(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            return
        if message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = API_INFO.sub(NO_API_INFO, b"".join(chunks))
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return capture


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def logged_in(app: Any, headers: list[tuple[bytes, bytes]]) -> bool:
    """True when the request carries a session token the app issued at login."""
    tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
    if not isinstance(tokens, dict) or not cookie_id:
        return False
    cookies: dict[str, str] = {}
    for name, value in headers:
        if name == b"cookie":
            # Starlette's parser, as gradio's own check uses: lenient where http.cookies would
            # drop every cookie after one it dislikes (a JSON value set by another site script).
            cookies.update(cookie_parser(value.decode("latin-1")))
    for key in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        token = cookies.get(key)
        if token and tokens.get(token) is not None:
            return True
    return False


class LoginWall:
    """ASGI middleware: refuse every non-public request without a login (see the module doc)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        gradio_app = scope.get("app")  # set by Starlette before any middleware runs
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if logged_in(gradio_app, scope.get("headers", [])):
            return await self.app(scope, receive, send)
        if path == "/" and scope["type"] == "http" and scope.get("method") == "GET":
            return await self.app(scope, receive, _without_api_info(send))
        if is_public(path):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(DENIED)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": DENIED})
