"""A stand-in for the Hugging Face Hub (HF_ENDPOINT points at it) that records every request and
the token it carried, so a test can say which tokens the app ever showed the Hub.

It knows two visitors' tokens (whoami answers with their account); creating a repo succeeds;
anything else is a 404, which the libraries report as a missing model, dataset or file."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Seen:
    method: str
    path: str
    auth: str | None
    body: bytes


@dataclass
class FakeHub:
    accounts: dict[str, str]  # token -> account name
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                auth = self.headers.get("authorization")
                hub.seen.append(Seen(self.command, self.path, auth, body))
                token = auth.split(" ", 1)[1] if auth and " " in auth else None
                if self.path.startswith("/api/whoami"):
                    if token in hub.accounts:
                        return self._json(200, {"name": hub.accounts[token], "type": "user", "orgs": [],
                                                "auth": {"accessToken": {"role": "write"}}})
                    return self._json(401, {"error": "Invalid credentials in Authorization header"})
                if self.path.startswith("/api/repos/create") and token in hub.accounts:
                    name = json.loads(body or b"{}").get("name", "x")
                    return self._json(200, {"url": f"{hub.url}/{hub.accounts[token]}/{name}"})
                return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

            def _json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()

    def tokens(self) -> set[str | None]:
        return {s.auth for s in self.seen}
