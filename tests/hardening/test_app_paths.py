"""Paths through the real web app: hostile upload file names (`../../x.jsonl`, absolute paths, NUL,
newline, unicode, 250-byte names) are stored as one safe name inside RUNS/.uploads; crafted
FileData pointing at server files, local paths typed in the Hub box and hostile run ids in every
endpoint that takes one are refused; and nothing outside the runs folder is written or read."""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.hardening.webapp import EXAMPLE, assert_serving, fn_index, inspect, raw_call, settings, tree
from tests.ui.conftest import launch_app, stop_app, train_tiny_run

ROWS = b"".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}).encode() + b"\n" for i in range(6))
HOSTILE_NAMES = [
    "../../x.jsonl",
    "../../../../../../tmp/escaped.jsonl",
    "/etc/evil.jsonl",
    "/tmp/absolute.jsonl",
    "C:\\Windows\\evil.jsonl",
    "a/../../../b.jsonl",
    "a\x00b.jsonl",
    "a\nb.jsonl",
    "a\r\nContent-Type: text/html\r\n.jsonl",
    "ünï cødé 数据 📊.jsonl",
    "x" * 240 + ".jsonl",
    "数" * 80 + ".jsonl",  # 240 bytes of UTF-8
    ".hidden.jsonl",
    "....jsonl",
    ".runner.lock.jsonl",
    "%2e%2e%2fx.jsonl",
    "<img src=x onerror=alert(1)>.jsonl",
    "con.jsonl",
    " spaced name .jsonl",
    "-rf.jsonl",
]
SAFE_STORED = re.compile(r"^[0-9a-f]{12}-[\w.-]+$")
BAD_RUN_IDS = ["../x", "..", "../../etc", "/etc", "/tmp", "a/../../x", "./x", "~root", "a\x00b", "a\nb", ".uploads", "x/.."]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("app-paths")
    (root / "outside").mkdir()
    (root / "outside" / "secret.jsonl").write_bytes(ROWS)  # a target worth reaching, next to the runs folder
    return root


@pytest.fixture(scope="module")
def app(root, tiny_llama_dir):
    (root / "runs").mkdir()
    train_tiny_run(root / "runs", tiny_llama_dir, run_id="done", steps=2)
    launched = launch_app(root / "runs", tiny_llama_dir, root / "app.log")
    yield launched
    stop_app(launched)


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def outside_before(app, root) -> dict[str, float]:
    """Everything under the test's root but outside the runs folder, as it was before any attack."""
    return {p: t for p, t in tree(root).items() if not p.startswith(str(root / "runs")) and not p.endswith("app.log")}


def upload_raw(app, name: str, content: bytes = ROWS) -> str:
    """The upload route with the file name exactly as an attacker sends it (no browser, no client)."""
    response = httpx.post(app.url + "gradio_api/upload", files={"files": (name, content, "application/octet-stream")}, timeout=30)
    assert response.status_code in (200, 400), response.text
    return response.json()[0] if response.status_code == 200 else ""


def assert_uploads_contained(app) -> None:
    uploads = app.runs_dir / ".uploads"
    for path in uploads.rglob("*"):
        assert path.parent == uploads, f"{path} is not directly in .uploads"
        assert SAFE_STORED.match(path.name), path.name
        assert len(path.name.encode()) <= 133 and path.resolve().parent == uploads.resolve()
        assert not path.is_symlink()


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[repr(n)[:40] for n in HOSTILE_NAMES])
def test_hostile_upload_name_stays_inside_the_runs_folder(app, client, root, outside_before, tiny_llama_dir, name):
    server_path = upload_raw(app, name)
    if not server_path:  # refused by gradio's upload route (a name that is only dots): fine too
        return
    data = {"path": server_path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}
    from lora_studio.ui.common import Studio  # noqa: F401 - the code under test, for the reader

    answer = raw_call(app, fn_index(app, "inspect_data"), [data, None, "", "auto", "", "", tiny_llama_dir, 128], client.session_hash)
    if answer["success"]:
        summary = answer["output"]["data"][1]  # [0] is the per-visitor state
        assert "ready to train" in summary
        assert "<img" not in summary  # the name is escaped in the summary's markup
    else:  # refused: the message says why (gradio's own type check for a name without the extension)
        assert "Invalid file type" in (answer["output"].get("error") or "")
    assert_uploads_contained(app)
    after = {p: t for p, t in tree(root).items() if not p.startswith(str(root / "runs")) and not p.endswith("app.log")}
    assert after == outside_before
    for escaped in (Path("/tmp/escaped.jsonl"), Path("/etc/evil.jsonl"), Path("/tmp/absolute.jsonl"), root / "x.jsonl"):
        assert not escaped.exists()


def test_client_uploads_with_odd_local_names(app, client, tmp_path, tiny_llama_dir):
    """The ordinary path (gradio_client uploading a local file) with names a file system allows."""
    for name in ["new\nline.jsonl", "ünï cødé 数据.jsonl", "y" * 200 + ".jsonl", ".dot.jsonl", "tab\tname.jsonl"]:
        path = tmp_path / name
        path.write_bytes(ROWS)
        summary, *_ = inspect(client, path, tiny_llama_dir)
        assert "ready to train" in summary
    assert_uploads_contained(app)
    names = [p.name for p in (app.runs_dir / ".uploads").iterdir()]
    assert any("ünï_cødé_数据.jsonl" in n for n in names)  # letters of any script are kept


def test_a_run_from_a_hostile_name_points_inside_the_runs_folder(app, client, tiny_llama_dir):
    server_path = upload_raw(app, "../../../../../../tmp/escaped.jsonl", ROWS + b'{"instruction": "extra", "output": "x"}\n')
    data = {"path": server_path, "orig_name": "../../../../../../tmp/escaped.jsonl", "meta": {"_type": "gradio.FileData"}}
    answer = raw_call(app, fn_index(app, "inspect_data"), [data, None, "", "auto", "", "", tiny_llama_dir, 128], client.session_hash)
    assert answer["success"], answer
    text = client.predict(*settings(tiny_llama_dir, max_steps=1, batch_size=2), api_name="/start")[0]
    run_id = text.split("**")[1].split(":")[0]
    from lora_studio.runner import Runner

    assert Runner(app.runs_dir).wait(run_id, timeout=120)["state"] == "done"
    config = json.loads((app.runs_dir / run_id / "config.json").read_text())
    data_path = Path(config["data"])
    assert data_path.parent == (app.runs_dir / ".uploads").resolve() and data_path.name.endswith("escaped.jsonl")
    assert not Path("/tmp/escaped.jsonl").exists()
    table = client.predict([], None, api_name="/runs")[0]
    row = dict(zip(table["headers"], next(r for r in table["data"] if r[0] == run_id)))
    assert row["data"] == "escaped.jsonl"  # the runs table shows the name, not the digest


SERVER_FILES = ["/etc/passwd", "/etc/hostname", "@outside/secret.jsonl", "@runs/done/config.json", "@runs/done/metrics.jsonl", "app.py"]


@pytest.mark.parametrize("target", SERVER_FILES)
def test_crafted_file_data_cannot_read_server_files(app, client, root, tiny_llama_dir, target):
    """A FileData whose path names a file that was never uploaded: gradio refuses to touch it."""
    path = str(root / target[1:]) if target.startswith("@") else target
    data = {"path": path, "orig_name": "x.jsonl", "meta": {"_type": "gradio.FileData"}}
    answer = raw_call(app, fn_index(app, "inspect_data"), [data, None, "", "auto", "", "", tiny_llama_dir, 128], client.session_hash)
    assert answer["success"] is False
    assert "q0" not in json.dumps(answer) and "root:" not in json.dumps(answer)


HUB_BOX = ["/etc/passwd", "../../../etc/passwd", "@outside/secret.jsonl", "examples/json_answers.jsonl", "examples",
           "hub:../outside", "~root/x", "@runs", "runs/.uploads", ".uploads/x", "a/b/c", "hf://datasets/../x"]  # fmt: skip


@pytest.mark.parametrize("text", HUB_BOX)
def test_the_hub_box_never_reads_local_files(app, client, root, tiny_llama_dir, text):
    text = str(root / text[1:]) if text.startswith("@") else text
    with pytest.raises(AppError, match="is not a Hub dataset id"):
        inspect(client, None, tiny_llama_dir, hub=text)


RUN_ID_CALLS = {
    "chat": lambda r: (r, "hi", [], [], 0.0, 1.0, 8),
    "blind_ask": lambda r: (r, "hi", 0.0, 1.0, 8),
    "batch": lambda r: (r, None, "validation", 0.0, 1.0, 8),
    "export_zip": lambda r: (r,),
    "export_merged": lambda r: (r, False),
    "push_to_hub": lambda r: (r, "someone/x", "", "adapter", True),
    "model_card": lambda r: (r,),
    "resume": lambda r: (r,),
    "delete": lambda r: (r, []),
    "overlay": lambda r: ([r],),
}


@pytest.mark.parametrize("endpoint", list(RUN_ID_CALLS))
def test_hostile_run_ids_are_refused_by_every_endpoint(app, client, root, outside_before, endpoint):
    for bad in BAD_RUN_IDS:
        try:
            out = client.predict(*RUN_ID_CALLS[endpoint](bad), api_name=f"/{endpoint}")
        except AppError as e:
            assert re.search(r"not a run id|invalid run id|Pick a run", str(e)), (bad, str(e))
        else:  # push_to_hub answers in its message box
            assert endpoint == "push_to_hub" and "Push failed" in out[1] and ("not a run id" in out[1] or "invalid" in out[1]), out
    after = {p: t for p, t in tree(root).items() if not p.startswith(str(root / "runs")) and not p.endswith("app.log")}
    assert after == outside_before
    assert (app.runs_dir / "done" / "adapter" / "adapter_config.json").exists()  # nothing deleted


@pytest.mark.parametrize("target", ["/etc/passwd", "@outside/secret.jsonl", "@runs/done/config.json", "@runs/.uploads", "app.py"])
def test_the_file_route_serves_nothing_outside_gradio_cache(app, root, target):
    path = str(root / target[1:]) if target.startswith("@") else target
    response = httpx.get(app.url + "gradio_api/file=" + urllib.parse.quote(path), timeout=10)
    assert response.status_code in (403, 404), (target, response.status_code)
    assert b"q0" not in response.content and b"root:" not in response.content


def test_a_symlinked_uploads_folder_is_refused(tmp_path):
    from lora_studio.ui.common import Studio
    from lora_studio.ui.settings import AppSettings

    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / ".uploads").symlink_to(tmp_path / "elsewhere")
    upload = tmp_path / "up.jsonl"
    upload.write_bytes(ROWS)
    studio = Studio(AppSettings(runs_dir=tmp_path / "runs"))
    with pytest.raises(ValueError, match="is a link"):
        studio.keep_upload(str(upload), "up.jsonl")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_the_app_still_serves(app, client, tiny_llama_dir):
    assert_serving(app, client, tiny_llama_dir)
