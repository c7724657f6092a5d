"""The optional login protects every endpoint: with LORA_STUDIO_USER/PASSWORD set, every route the
app serves (enumerated from gradio's own route table, not from a list typed here) and every event
(each fn_index of the page, named or not, through every way gradio runs one) answers 401 without
the login; the few public files of the login page hold nothing of the app; with the login, the
same calls work."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from tests.hardening.webapp import tree
from tests.ui.conftest import launch_app, stop_app, train_tiny_run

USER, PASSWORD = "ana", "s3cret-pass-for-tests"
# What the login page is made of (lora_studio/ui/login.py): served to anyone, must reveal nothing.
PUBLIC = re.compile(
    r"^/(login/?|logout/?|theme\.css|favicon\.ico|manifest\.json|robots\.txt|assets/.*|static/.*|svelte/.*|pwa_icon.*"
    r"|gradio_api/startup-events)?$"
)
# Bits of the app that must never reach someone without the login.
APP_MARKERS = ["data-file", "compare-run", "train-start", "done-run", "inspect_data"]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("app-login")
    (root / "runs").mkdir()
    train_tiny_run(root / "runs", tiny_llama_dir, run_id="done-run", steps=2)
    # GRADIO_MCP_SERVER would open an MCP server beside the login; the app turns it off.
    env = {"LORA_STUDIO_USER": USER, "LORA_STUDIO_PASSWORD": PASSWORD, "GRADIO_MCP_SERVER": "True"}
    launched = launch_app(root / "runs", tiny_llama_dir, root / "app.log", env)
    yield launched
    stop_app(launched)


@pytest.fixture(scope="module")
def logged_in(app) -> httpx.Client:
    session = httpx.Client(base_url=app.url, timeout=30)
    response = session.post("/login", data={"username": USER, "password": PASSWORD})
    assert response.status_code == 200, response.text
    assert session.get("/config").status_code == 200
    yield session
    session.close()


@pytest.fixture(scope="module")
def routes(tiny_llama_dir, tmp_path_factory) -> list[tuple[str, str]]:
    """(method, path) of every route of a gradio App built from our page, as gradio builds it."""
    from gradio.routes import App

    from lora_studio.ui.app import build_app
    from lora_studio.ui.settings import AppSettings

    demo = build_app(AppSettings(runs_dir=tmp_path_factory.mktemp("routes"), model=tiny_llama_dir, auth=(USER, PASSWORD)))
    demo.queue()
    found: list[tuple[str, str]] = []

    def walk(items, prefix: str = "") -> None:
        for route in items:
            if hasattr(route, "path"):
                for method in sorted(getattr(route, "methods", None) or ["GET"]):
                    found.append((method, prefix + route.path))
            else:  # an included router (gradio's /gradio_api/*)
                walk(route.original_router.routes, prefix + route.include_context.prefix)

    walk(App.create_app(demo).routes)
    assert len(found) > 60 and any(p == "/gradio_api/queue/join" for _, p in found)
    return found


def concrete(path: str, uploaded: str) -> str:
    """A route pattern with plausible values: a real uploaded file for file=, ids elsewhere."""
    path = path.replace("{path_or_url:path}", uploaded).replace("{path:path}", uploaded.lstrip("/"))
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_refuses_without_the_login(app, routes, logged_in, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"instruction": "secret question", "output": "secret answer"}\n')
    with data.open("rb") as fh:
        uploaded = logged_in.post("/gradio_api/upload", files={"files": ("mine.jsonl", fh)}).json()[0]
    assert logged_in.get(f"/gradio_api/file={uploaded}").status_code == 200  # the control: with the login
    before = tree(app.runs_dir)
    anonymous = httpx.Client(base_url=app.url, timeout=30)
    open_routes = []
    for method, pattern in routes:
        path = concrete(pattern, uploaded)
        response = anonymous.request(method, path, json={"data": [], "fn_index": 0, "session_hash": "x", "event_id": "x"})
        body = response.text
        if PUBLIC.match(path):
            assert not any(marker in body for marker in APP_MARKERS), (method, path, body[:300])
            assert "secret question" not in body
            continue
        if response.status_code != 401:
            open_routes.append((method, path, response.status_code, body[:120]))
    assert open_routes == [], open_routes
    assert tree(app.runs_dir) == before  # nothing written, started or deleted
    page = anonymous.get("/").text
    assert '"auth_required":true' in page.replace(" ", "") and '"dependencies":[]' in page.replace(" ", "")


def test_every_event_refuses_without_the_login(app, logged_in):
    """Each fn_index of the page (the named API and the undocumented events), through queue/join,
    run/predict and, for named ones, call/, call/v2/, run/ and api/."""
    dependencies = logged_in.get("/config").json()["dependencies"]
    named = [d["api_name"] for d in dependencies if d.get("api_name")]
    assert len(dependencies) > 30 and {"start", "delete", "chat", "push_to_hub", "inspect_data"} <= set(named)
    anonymous = httpx.Client(base_url=app.url, timeout=30)
    attempts = refused = 0
    before = tree(app.runs_dir)
    for dep in dependencies:
        body = {"data": [], "fn_index": dep["id"], "session_hash": uuid.uuid4().hex, "trigger_id": None}
        urls = [("POST", "/gradio_api/queue/join"), ("POST", "/gradio_api/run/predict")]
        if dep.get("api_name"):
            name = dep["api_name"]
            urls += [("POST", f"/gradio_api/{kind}/{name}") for kind in ("call", "call/v2", "run", "api")]
            urls += [("GET", f"/gradio_api/{kind}/{name}/{uuid.uuid4().hex}") for kind in ("call", "call/v2")]
        for method, url in urls:
            response = anonymous.request(method, url, json=body)
            attempts += 1
            refused += response.status_code == 401
            assert response.status_code == 401, (dep["id"], dep.get("api_name"), url, response.status_code)
    assert refused == attempts and attempts > 150
    assert tree(app.runs_dir) == before


def test_wrong_login_gets_nothing(app):
    session = httpx.Client(base_url=app.url, timeout=30)
    for user, password in [(USER, "wrong"), ("admin", PASSWORD), ("", ""), (USER, PASSWORD + " ")]:
        response = session.post("/login", data={"username": user, "password": password})
        assert response.status_code in (400, 401, 422), (user, response.status_code)
        assert session.get("/config").status_code == 401
        assert session.post("/gradio_api/upload", files={"files": ("a.jsonl", b"{}")}).status_code == 401
    forged = httpx.Client(base_url=app.url, timeout=30, cookies={"access-token-x": "forged", "access-token-unsecure-x": "forged"})
    assert forged.get("/gradio_api/info").status_code == 401
    assert forged.get("/gradio_api/heartbeat/x").status_code == 401
    with pytest.raises(Exception):
        Client(app.url, auth=(USER, "wrong"), verbose=False)


def test_with_the_login_the_app_works(app, logged_in, tiny_llama_dir):
    client = Client(app.url, auth=(USER, PASSWORD), verbose=False)
    table = client.predict([], None, api_name="/runs")[0]
    assert [r[0] for r in table["data"]] == ["done-run"]
    card = client.predict("done-run", api_name="/model_card")
    assert "library_name: peft" in card
    # Other cookies before the login's (a JSON value, which http.cookies would stop at) lock nobody out.
    header = "; ".join(['prefs={"theme": "dark"}', *(f"{k}={v}" for k, v in logged_in.cookies.items())])
    assert httpx.get(app.url + "gradio_api/info", headers={"cookie": header}, timeout=30).status_code == 200
    info = logged_in.get("/gradio_api/info").json()
    assert "/start" in info["named_endpoints"]
    assert logged_in.get("/gradio_api/mcp/schema").status_code == 404  # no MCP server, even with GRADIO_MCP_SERVER
    assert logged_in.get("/gradio_api/startup-events").status_code == 200
    assert app.process.poll() is None


@pytest.mark.browser
def test_the_login_page_still_logs_in(app, tmp_path):
    """A browser gets the login form, logs in, and sees the app: the wall leaves the login page's
    own files open and nothing else."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("no Chromium at /usr/bin/chromium: run scripts/setup.sh --dev")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            denied = []
            page.on("response", lambda r: denied.append(r.url) if r.status == 401 and "/config" not in r.url else None)
            page.goto(app.url)
            page.get_by_label("username").fill(USER)
            page.get_by_label("password").fill(PASSWORD)
            page.get_by_role("button", name="Login").click()
            page.get_by_text("Fine-tune a language model").wait_for(timeout=30_000)
            page.locator('button[role="tab"][data-tab-id="runs"]:visible').first.click()
            page.locator("#runs-table").get_by_text("done-run").locator("visible=true").first.wait_for(timeout=30_000)
            assert denied == [], denied
        finally:
            browser.close()
