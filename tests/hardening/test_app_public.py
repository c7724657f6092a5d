"""A public Space, tried as an attacker would: the real `python app.py` in public mode with a
planted server HF_TOKEN (in the environment and in HF_HOME's token file) and the Hub pointed at a
local fake that records every token it is shown (tests/hardening/fakehub.py).

Visitor A trains (two gradio_client sessions and two browser contexts are the visitors); visitor B
then tries every endpoint on A's runs, by name and by the undocumented events, and gets exactly
the answer a run that does not exist gets, while A's run goes on untouched. B cannot claim A's
anonymous id. The planted token reaches the fake Hub in no request, and appears in no response,
run file, log or training process environment. Remote code is refused; the limits hold with
messages naming their setting."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests.hardening.fakehub import FakeHub
from tests.hardening.webapp import EXAMPLE, inspect, settings, tree
from tests.helpers import wait_for
from tests.ui.conftest import launch_app, stop_app, train_tiny_run

PLANTED = "hf_PLANTEDserverSecret0123456789abcdef"
SECRET = "PLANTEDserverSecret"  # any piece of it anywhere is a leak
TOKEN_A = "hf_visitorAtoken0123456789abcdefgh"
GHOST = "20990101-000000-lora-ghost0"  # a run id that exists nowhere
LIMITS = {
    "LORA_STUDIO_MAX_STEPS": "5000", "LORA_STUDIO_MAX_EPOCHS": "50", "LORA_STUDIO_MAX_SEQ_LEN": "256",
    "LORA_STUDIO_MAX_NEW_TOKENS": "16", "LORA_STUDIO_MAX_PROMPT_CHARS": "200", "LORA_STUDIO_MAX_BATCH_PROMPTS": "3",
    "LORA_STUDIO_MAX_WALL_S": "0",  # the wall-time cap: tests/test_runner.py (it needs a run of its own)
}  # fmt: skip
GREEDY = (0.0, 1.0, 8)


@pytest.fixture(scope="module")
def hub():
    fake = FakeHub({TOKEN_A: "visitor-a"}).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app-public")


@pytest.fixture(scope="module")
def app(root, tiny_llama_dir, hub):
    (root / "runs").mkdir()
    train_tiny_run(root / "runs", tiny_llama_dir, run_id="legacy", steps=2)  # no owner recorded: nobody's
    hf_home = root / "hf-home"
    hf_home.mkdir()
    (hf_home / "token").write_text(PLANTED)  # what `huggingface-cli login` leaves behind
    env = {
        "LORA_STUDIO_MODE": "public", "HF_TOKEN": PLANTED, "HUGGING_FACE_HUB_TOKEN": PLANTED, "HF_HOME": str(hf_home),
        "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "GRADIO_TEMP_DIR": str(root / "gradio-tmp"), **LIMITS,
    }  # fmt: skip
    launched = launch_app(root / "runs", tiny_llama_dir, root / "app.log", env)
    yield launched
    stop_app(launched)


ANSWERS: list[str] = []  # every response of the app in this module, searched for the planted token


def call(client: Client, *args, api_name: str | None = None, fn_index: int | None = None) -> tuple[bool, str]:
    """(ok, text): the answer, or the error message, as text."""
    try:
        out = client.predict(*args, api_name=api_name) if api_name else client.predict(*args, fn_index=fn_index)
        text = json.dumps(out, default=str)
        ANSWERS.append(text)
        return True, text
    except AppError as e:
        ANSWERS.append(str(e))
        return False, str(e)


def status_of(app, run_id: str) -> dict:
    return json.loads((app.runs_dir / run_id / "status.json").read_text())


def run_id_of(text: str) -> str:
    return re.search(r"\*\*(\S+): ", text).group(1)


def table_ids(client: Client) -> set[str]:
    table = client.predict([], None, api_name="/runs")[0]
    ANSWERS.append(json.dumps(table))
    return {row[0] for row in table["data"] if row and row[0]}


def dependencies(app) -> list[dict]:
    return httpx.get(app.url + "config", timeout=10).json()["dependencies"]


def fn_of(app, name: str) -> int:
    """The fn_index of an undocumented event, by its function's name (gradio's default api_name)."""
    return next(d["id"] for d in dependencies(app) if d.get("api_name") == name)


@pytest.fixture(scope="module")
def world(app, tiny_llama_dir):
    """Visitor A with a finished run (adapter) and a run training now; visitor B with nothing."""
    a, b = Client(app.url, verbose=False), Client(app.url, verbose=False)
    assert "ready to train" in inspect(a, EXAMPLE, tiny_llama_dir)[0]
    ok, text = call(a, *settings(tiny_llama_dir, max_steps=4, checkpoint_every=2, eval_every=0), api_name="/start")
    assert ok, text
    done = run_id_of(json.loads(text)[0])
    wait_for(lambda: status_of(app, done).get("state") == "done", timeout=180, every=0.3)
    ok, text = call(a, *settings(tiny_llama_dir, max_steps=5000, checkpoint_every=0, eval_every=0), api_name="/start")
    assert ok, text
    live = run_id_of(json.loads(text)[0])
    wait_for(lambda: status_of(app, live).get("state") == "running" and status_of(app, live).get("step", 0) >= 1, timeout=180, every=0.3)
    return {"a": a, "b": b, "done": done, "live": live}


def test_each_run_records_its_owner_and_each_visitor_lists_only_their_own(app, world):
    a, b, done, live = world["a"], world["b"], world["done"], world["live"]
    owners = {rid: json.loads((app.runs_dir / rid / "owner.json").read_text())["owner"] for rid in (done, live)}
    assert owners[done] == owners[live] and owners[done].startswith("anon-")
    assert table_ids(a) == {done, live}  # not the legacy run, which has no owner
    assert table_ids(b) == set()
    ok, attached = call(b, api_name="/attach")
    assert ok and "No run yet" in attached and live not in attached
    ok, attached = call(a, api_name="/attach")
    assert ok and f"{live}: training" in attached
    ok, picker = call(b, None, api_name="/compare_runs")
    assert ok and done not in picker and "legacy" not in picker


# Each endpoint that takes a run id, with B's arguments.
BY_NAME = {
    "chat": lambda r: (r, "hi", [], [], *GREEDY),
    "blind_ask": lambda r: (r, "hi", *GREEDY),
    "vote_a": lambda r: (r,),
    "vote_b": lambda r: (r,),
    "vote_tie": lambda r: (r,),
    "batch": lambda r: (r, None, "validation", *GREEDY),
    "score": lambda r: (r, None, "validation", *GREEDY),
    "export_zip": lambda r: (r,),
    "export_merged": lambda r: (r, True),
    "push_to_hub": lambda r: (r, "visitor-a/stolen", TOKEN_A, "adapter", True),
    "model_card": lambda r: (r,),
    "resume": lambda r: (r,),
    "delete": lambda r: (r, []),
    "overlay": lambda r: ([r],),
}
# The undocumented events that take a run id (the Runs tab's Show and Delete…, the Compare tab's
# run change), by their function's name.
BY_FN = {"show_run": lambda r: (r,), "ask_delete": lambda r: (r,), "defaults": lambda r: (r,), "show_tally": lambda r: (r,)}


def normal(text: str, run_id: str) -> str:
    return text.replace(run_id, "RUN")


def test_b_acting_on_a_runs_gets_the_answer_of_a_run_that_does_not_exist(app, world, hub):
    a, b, done, live = world["a"], world["b"], world["done"], world["live"]
    before = {rid: tree(app.runs_dir / rid) for rid in (done,)}
    hub_before = len(hub.seen)
    refused = 0
    calls = [(name, make, {"api_name": f"/{name}"}) for name, make in BY_NAME.items()]
    calls += [(name, make, {"fn_index": fn_of(app, name)}) for name, make in BY_FN.items()]
    for name, make, how in calls:
        for run_id in (done, live, "legacy"):
            ok_a, answer = call(b, *make(run_id), **how)
            ok_g, ghost = call(b, *make(GHOST), **how)
            assert normal(answer, run_id) == normal(ghost, GHOST), (name, run_id, answer, ghost)
            assert "not found" in answer, (name, run_id, answer)
            assert not ok_a or name == "push_to_hub"  # the push answers in its message box
            refused += 1
    assert refused == 3 * len(calls)
    # B's Stop and Abort have no run of B's to act on; A's run trains on.
    for name in ("stop", "abort"):
        ok, text = call(b, api_name=f"/{name}")
        assert not ok and "No run to stop" in text
    step = status_of(app, live)["step"]
    wait_for(lambda: status_of(app, live).get("step", 0) > step, timeout=60, every=0.3)
    assert status_of(app, live)["state"] == "running" and not (app.runs_dir / live / "control.json").exists()
    # A's finished run: not a file changed, created or removed; nothing reached the Hub.
    assert {rid: tree(app.runs_dir / rid) for rid in (done,)} == before
    assert len(hub.seen) == hub_before
    assert (app.runs_dir / "legacy" / "adapter" / "adapter_config.json").exists()
    # And A still can: the same endpoints work for the owner.
    ok, card = call(a, done, api_name="/model_card")
    assert ok and "library_name: peft" in card
    ok, chat = call(a, done, "hi", [], [], *GREEDY, api_name="/chat")
    assert ok and '"role": "assistant"' in chat


def test_b_cannot_claim_a_s_anonymous_id(app, world):
    b, done, live = world["b"], world["done"], world["live"]
    owner = json.loads((app.runs_dir / done / "owner.json").read_text())["owner"]
    identify = fn_of(app, "identify")
    for forged in (owner, f"{owner}.{'0' * 64}", f"{owner}.", "local", "hf:visitor-a", None, {"owner": owner}):
        ok, token = call(b, forged, fn_index=identify)
        assert ok and owner not in token  # a fresh id of B's own, signed by the server
        assert table_ids(b) == set()
        ok, text = call(b, done, api_name="/model_card")
        assert not ok and "not found" in text
    assert status_of(app, live)["state"] == "running"


def test_the_server_token_is_never_used_for_a_visitor(app, world, hub, tiny_llama_dir, root):
    a, b, done = world["a"], world["b"], world["done"]
    # A push without a token of the visitor's own: refused before the Hub is asked anything.
    seen = len(hub.seen)
    ok, text = call(a, done, "visitor-a/mine", "", "adapter", True, api_name="/push_to_hub")
    assert "Push failed" in text and "sign in with Hugging Face, or type a token" in text and len(hub.seen) == seen
    # With the visitor's token: only into the visitor's namespace; the Hub sees that token.
    ok, text = call(a, done, "someone-else/mine", TOKEN_A, "adapter", True, api_name="/push_to_hub")
    assert "Push failed" in text and "can push to visitor-a only" in text
    ok, text = call(a, done, "visitor-a/mine", TOKEN_A, "adapter", True, api_name="/push_to_hub")
    assert any(s.path.startswith("/api/repos/create") and s.auth == f"Bearer {TOKEN_A}" for s in hub.seen)
    assert TOKEN_A not in text  # the typed token is not echoed
    # Hub loads for a visitor: a model id (tokenizer, preflight) and a dataset id, all to the fake Hub.
    seen = len(hub.seen)
    call(b, None, "json_answers.jsonl", "", "auto", "", "", "someone/gated-model", 128, api_name="/inspect_data")
    call(b, None, None, "someone/private-data", "auto", "", "", tiny_llama_dir, 128, api_name="/inspect_data")
    call(b, *settings("someone/gated-model")[:-1], False, api_name="/preflight")
    new = hub.seen[seen:]
    paths = " ".join(s.path for s in new)
    assert "gated-model" in paths and "private-data" in paths, paths  # the Hub was really asked
    assert {s.auth for s in new} == {None}, {s.auth for s in new}
    # In no request the fake Hub ever saw, anywhere in this module.
    assert not [s for s in hub.seen if SECRET in (s.auth or "") or SECRET.encode() in s.body or SECRET in s.path]


def test_the_training_processes_get_no_secret(app, world):
    live = world["live"]
    sup = json.loads((app.runs_dir / live / "supervisor.json").read_text())
    for pid in (sup["pid"], sup["worker_pid"]):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        names = {e.split(b"=", 1)[0].decode() for e in environ if e}
        assert SECRET.encode() not in b"\0".join(environ)
        assert not names & {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "LORA_STUDIO_SECRET"}, names
        assert b"HF_HUB_DISABLE_IMPLICIT_TOKEN=1" in environ and b"LORA_STUDIO_MODE=public" in environ
        assert "PATH" in names


def test_remote_code_is_not_offered_and_refused(app, world, tiny_llama_dir):
    a = world["a"]
    trust = [c for c in httpx.get(app.url + "config", timeout=10).json()["components"]
             if c.get("props", {}).get("elem_id") == "trust-remote-code"]
    assert len(trust) == 1 and trust[0]["props"]["visible"] is False
    ok, text = call(a, *settings(tiny_llama_dir, trust_remote_code=True), api_name="/start")
    assert not ok and "Trust remote code is turned off on this server" in text
    ok, text = call(a, *settings(tiny_llama_dir)[:-1], True, api_name="/preflight")
    assert ok and "Trust remote code is turned off" in text


def test_the_limits_hold_with_clear_messages(app, world, tiny_llama_dir, tmp_path):
    a, done, live = world["a"], world["done"], world["live"]
    runs_before = set(os.listdir(app.runs_dir))
    cases = [
        ({}, f"already have 1 run(s) queued or training ({live})"),  # one per visitor
    ]
    for over, words in cases:
        ok, text = call(a, *settings(tiny_llama_dir, **over), api_name="/start")
        assert not ok and words in text and "LORA_STUDIO_MAX_RUNS_PER_VISITOR" in text, text
    c = Client(app.url, verbose=False)  # a visitor with no run yet: the caps on one run's settings
    inspect(c, EXAMPLE, tiny_llama_dir)
    for over, words in [
        ({"epochs": 51}, "over this server's limit of 50 per run (LORA_STUDIO_MAX_EPOCHS)"),
        ({"max_seq_len": 512}, "Value 512 is greater than maximum value 256"),  # the slider ends at the cap
        ({"max_steps": 5001}, "over this server's limit of 5000 per run (LORA_STUDIO_MAX_STEPS)"),
    ]:
        ok, text = call(c, *settings(tiny_llama_dir, **over), api_name="/start")
        assert not ok and words in text, text
    assert set(os.listdir(app.runs_dir)) == runs_before  # nothing queued by a refused start
    ok, text = call(a, done, "x" * 201, [], [], *GREEDY, api_name="/chat")
    assert not ok and "201 characters, over this server's limit of 200 (LORA_STUDIO_MAX_PROMPT_CHARS)" in text
    ok, text = call(a, done, "hi", 0.0, 1.0, 64, api_name="/blind_ask")
    # The slider's maximum is the cap (its label says so), and gradio refuses a value beyond it.
    assert not ok and "Value 64 is greater than maximum value 16" in text
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\nfour\n")
    ok, text = call(a, done, handle_file(str(prompts)), "upload", *GREEDY, api_name="/batch")
    assert not ok and "4 prompts is over this server's limit of 3 per batch (LORA_STUDIO_MAX_BATCH_PROMPTS)" in text
    # Under the caps, the same calls work.
    prompts.write_text("one\ntwo\n")
    ok, text = call(a, done, handle_file(str(prompts)), "upload", *GREEDY, api_name="/batch")
    assert ok and "one" in text



def test_a_bakeoff_is_its_visitor_s_own_and_counts_against_the_run_limit(app, world, tiny_llama_dir):
    from lora_studio import bakeoff
    from lora_studio.config import TrainConfig

    a, b, done, live = world["a"], world["b"], world["done"], world["live"]
    owner = json.loads((app.runs_dir / done / "owner.json").read_text())["owner"]
    bk_id, ghost = "bk20990101-000000-abcd", "bk20990101-000000-0000"
    folder = app.runs_dir / ".bakeoffs" / bk_id
    bakeoff.create(folder, TrainConfig(data=str(EXAMPLE), model=tiny_llama_dir), "lora,dora", owner=owner, bk_id=bk_id)
    before = (folder / bakeoff.BAKEOFF_FILE).read_bytes()
    for name in ("bakeoff_show", "bakeoff_stop", "bakeoff_tick"):
        ok_b, answer = call(b, bk_id, api_name=f"/{name}")
        ok_g, answer_ghost = call(b, ghost, api_name=f"/{name}")
        assert ok_b == ok_g and answer.replace(bk_id, "BK") == answer_ghost.replace(ghost, "BK"), (name, answer)
        assert ok_b or "not found" in answer, (name, answer)
    # B cancelled nothing; nothing started either (A has a run training: the app's background
    # advance of A's series waits for it)
    assert (folder / bakeoff.BAKEOFF_FILE).read_bytes() == before and not bakeoff.load(folder)["runs"]
    ok, shown = call(a, bk_id, api_name="/bakeoff_show")
    assert ok and "lora" in shown and "waiting" in shown
    # A's start of a new bake-off: A already has a run training, one per visitor here.
    ok, text = call(a, ["lora", "dora"], *settings(tiny_llama_dir), api_name="/bakeoff_start")
    assert not ok and f"already have 1 run(s) queued or training ({live})" in text, text
    assert {d.name for d in (app.runs_dir / ".bakeoffs").iterdir()} == {bk_id}
    ok, text = call(a, bk_id, api_name="/bakeoff_stop")  # the owner can; and no later test sees it start
    assert ok and bakeoff.load(folder)["cancelled"] and "cancelled" in text


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.browser
def test_two_browsers_each_see_only_their_own_run_and_keep_it_across_a_reload(app, world):
    """Browser A queues a run (behind client A's, which holds the device) through the page; a
    reload finds it again (the signed id in localStorage). Browser B, a fresh page meanwhile,
    attaches to nothing and lists nothing of A's (neither browser's nor client's)."""
    if not CHROMIUM.exists():
        pytest.skip("no Chromium at /usr/bin/chromium: run scripts/setup.sh --dev")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    live, done = world["live"], world["done"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page_a = browser.new_context().new_page()
            page_a.set_default_timeout(60_000)
            page_a.goto(app.url)
            page_a.set_input_files("#data-file input[type=file]", str(EXAMPLE))
            page_a.wait_for_selector("#data-summary :text('ready to train')")
            page_a.locator('button[role="tab"][data-tab-id="train"]:visible').first.click()
            page_a.wait_for_selector("#preflight :text('trainable parameters')")
            page_a.locator("#train-start").click()
            page_a.wait_for_function("() => /\\S+: queued/.test(document.querySelector('#run-status').innerText)")
            status = page_a.locator("#run-status").inner_text()
            mine = re.match(r"(\S+): queued", status).group(1)
            assert "(position 1)" in status and mine not in (live, done)
            owner_a = json.loads((app.runs_dir / mine / "owner.json").read_text())["owner"]
            assert owner_a != json.loads((app.runs_dir / live / "owner.json").read_text())["owner"]

            page_a.reload()  # the same visitor: the page reattaches to its own queued run
            page_a.locator('button[role="tab"][data-tab-id="train"]:visible').first.click()
            page_a.wait_for_selector(f"#run-status :text('{mine}: queued')")

            page_b = browser.new_context().new_page()  # another visitor, fresh
            page_b.set_default_timeout(60_000)
            page_b.goto(app.url)
            page_b.locator('button[role="tab"][data-tab-id="train"]:visible').first.click()
            page_b.wait_for_selector("#run-status :text('No run yet')")
            page_b.wait_for_timeout(3000)  # a few timer ticks: still nothing of A's
            assert "No run yet" in page_b.locator("#run-status").inner_text()
            page_b.locator('button[role="tab"][data-tab-id="runs"]:visible').first.click()
            page_b.locator("#runs-refresh").click()
            page_b.wait_for_timeout(1000)
            shown = page_b.locator("#runs-table").inner_text()
            assert "final loss" in shown  # the table is drawn, with none of A's runs in it
            assert not [r for r in (mine, live, done, "legacy") if r in shown]
            page_b.locator("#runs-one input").first.click()  # nor in the run picker
            assert not [r for r in (mine, live, done, "legacy") if page_b.get_by_role("option", name=re.compile(re.escape(r))).count()]

            page_a.locator('button[role="tab"][data-tab-id="runs"]:visible').first.click()
            page_a.wait_for_function(f"() => document.querySelector('#runs-table').innerText.includes('{mine}')")
            assert live not in page_a.locator("#runs-table").inner_text()  # client A is another visitor
            page_a.locator('button[role="tab"][data-tab-id="train"]:visible').first.click()
            page_a.locator("#train-abort").click()
            page_a.wait_for_selector(f"#run-status :text('{mine}: aborted')")
        finally:
            browser.close()
    assert status_of(app, live)["state"] == "running"


def test_the_planted_token_appears_in_no_response_file_or_log(app, world, root):
    a, live = world["a"], world["live"]
    assert all(SECRET not in text for text in ANSWERS) and len(ANSWERS) > 50
    ok, text = call(a, api_name="/stop")
    assert ok
    wait_for(lambda: status_of(app, live).get("state") == "stopped", timeout=120, every=0.3)
    page = httpx.get(app.url, timeout=10).text + httpx.get(app.url + "config", timeout=10).text
    assert SECRET not in page
    leaks = []
    for folder in (app.runs_dir, root / "gradio-tmp"):
        for path in folder.rglob("*") if folder.exists() else []:
            if path.is_file() and SECRET.encode() in path.read_bytes():
                leaks.append(str(path))
    assert leaks == []
    assert SECRET not in app.log_text() and "public mode" in app.log_text()
