"""Bad input and hostile paths through the real web app (`python app.py`, driven with gradio_client
and raw HTTP), one launched app for the module.

Bad input: malformed uploads and nonsense settings end in a clear message on the page naming the
file (and row and field where there is one), no run folder is created for a refused start, and
the app process keeps serving good calls afterwards.

Paths: hostile upload file names (`../../x.jsonl`, absolute paths, NUL, newline, unicode, 240-byte
names) are stored as one safe name inside RUNS/.uploads; crafted FileData pointing at server files,
local paths typed in the Hub box and hostile run ids in every endpoint that takes one are refused;
nothing outside the runs folder is written or read."""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import urllib.parse
import zipfile
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.hardening.webapp import (
    EXAMPLE, assert_serving, fn_index, inspect, problems_of, raw_call, run_folders, settings, tree,
)  # fmt: skip
from tests.ui.conftest import launch_app, stop_app, train_tiny_run

DATA_MB = 0.5  # LORA_STUDIO_MAX_UPLOAD_MB: the data size limit, checked before the file is copied
UPLOAD_LIMIT = "1mb"  # LORA_STUDIO_MAX_UPLOAD: gradio's own limit on the upload route


def _rows(n: int) -> str:
    return "".join(json.dumps({"instruction": f"question {i}", "output": f"answer {i}"}) + "\n" for i in range(n))


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.jsonl", _rows(4))
    return buf.getvalue()


def _parquet(rows: list[dict], broken: bool = False) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"instruction": [r["instruction"] for r in rows], "output": [r["output"] for r in rows]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    return data[: len(data) // 2] + data[-8:] if broken else data  # footer kept, body cut: a truncated download


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
BAD_RUN_IDS = ["../x", "/etc", "a/../../x", "~root", "a\x00b", ".uploads"]  # the Runner itself is swept with 12 (test_paths.py)


# (case, file name, content, words the message must hold, row, field): row/field None = file-level
DATA_CASES = [
    ("binary junk", "junk.jsonl", bytes(range(256)) * 8, "binary data", None, None),
    ("zip renamed .jsonl", "export.jsonl", _zip(), "zip archive", None, None),
    ("gzip renamed .jsonl", "dump.jsonl", gzip.compress(_rows(4).encode()), "gzip archive", None, None),
    ("PDF renamed .csv", "report.csv", b"%PDF-1.7\n" + b"x" * 200, "PDF document", None, None),
    ("PNG renamed .json", "photo.json", b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "PNG image", None, None),
    ("malformed JSON", "cut.json", b'[{"instruction": "a", "output": ', "not valid JSON", None, None),
    ("JSON that is a number", "number.json", b"42", "expected an array", None, None),
    ("malformed JSONL line", "line5.jsonl", (_rows(4) + '{"instruction": "x", "output": \n').encode(), "not valid JSON", 5, None),
    ("JSONL line that is a list", "list.jsonl", (_rows(2) + "[1, 2]\n").encode(), "expected a JSON object", 3, None),
    ("malformed CSV", "quote.csv", b'instruction,output\n"never closed,x\ny,z\n', "not valid CSV", None, None),
    ("malformed Parquet", "junk.parquet", b"PAR1" + b"\x00" * 100 + b"PAR1", "not a readable Parquet file", None, None),
    ("truncated Parquet", "cut.parquet", _parquet([{"instruction": "q", "output": "a"}] * 50, broken=True), "not a readable Parquet file", None, None),
    ("JSONL named .parquet", "text.parquet", _rows(4).encode(), "not a readable Parquet file", None, None),
    ("huge row (300 000 characters)", "huge.jsonl", (json.dumps({"instruction": "x " * 150_000, "output": "y"}) + "\n" + _rows(3)).encode(), "no reply token within max_seq_len", 1, None),
    ("deeply nested JSON", "deep.json", b"[" * 50_000 + b"]" * 50_000, "nested too deeply", None, None),
    ("deeply nested JSONL row", "deep.jsonl", b'{"instruction": ' + b"[" * 50_000 + b"]" * 50_000 + b', "output": "x"}\n', "nested too deeply", 1, None),
    ("zero rows (JSON)", "none.json", b"[]", "holds no rows", None, None),
    ("zero rows (CSV header only)", "header.csv", b"instruction,output\n", "holds no rows", None, None),
    ("zero rows (Parquet)", "none.parquet", _parquet([]), "holds no rows", None, None),
    ("empty file", "empty.jsonl", b"", "the file is empty", None, None),
    ("blank lines only", "blank.jsonl", b"\n  \n\n", "the file is empty", None, None),
    ("UTF-16 text", "utf16.jsonl", _rows(2).encode("utf-16"), "UTF-16", None, None),
    ("missing field", "nofield.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "missing", 2, "output"),
    ("wrong type", "number.jsonl", b'{"instruction": "a", "output": 3}\n', "expected text", 1, "output"),
    ("bytes that are not UTF-8", "latin1.jsonl", b'{"instruction": "caf\xe9", "output": "b"}\n', "UTF-8", 1, "instruction"),
]
# Refused before the data is read: the message names the file and the limit or the accepted types.
REFUSED_UPLOADS = [
    ("over the data size limit", "big.jsonl", _rows(12_000).encode(), "over the 0.5 MB limit"),
    ("wrong extension .txt", "data.txt", _rows(4).encode(), "Invalid file type"),
    ("wrong extension .exe", "setup.exe", b"MZ" + b"\x00" * 100, "Invalid file type"),
    ("no extension", "data", _rows(4).encode(), "Invalid file type"),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("app-inputs")
    (root / "outside").mkdir()
    (root / "outside" / "secret.jsonl").write_bytes(ROWS)  # a target worth reaching, next to the runs folder
    return root


@pytest.fixture(scope="module")
def app(root, tiny_llama_dir):
    (root / "runs").mkdir()
    train_tiny_run(root / "runs", tiny_llama_dir, run_id="done", steps=2)  # for the endpoints that take a run id
    launched = launch_app(
        root / "runs", tiny_llama_dir, root / "app.log",
        {"LORA_STUDIO_MAX_UPLOAD_MB": str(DATA_MB), "LORA_STUDIO_MAX_UPLOAD": UPLOAD_LIMIT},
    )  # fmt: skip
    yield launched
    stop_app(launched)


@pytest.fixture(scope="module")
def client(app, outside_before):
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.mark.parametrize("case,name,content,words,row,field", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_malformed_upload_is_named_on_the_page(app, client, files, tiny_llama_dir, case, name, content, words, row, field):
    path = files / name
    path.write_bytes(content)
    summary, problems, *_ = inspect(client, path, tiny_llama_dir)
    assert "cannot train" in summary and f"**{name}**" in summary, summary
    errors = [p for p in problems_of(problems) if p["severity"] == "error"]
    assert any(words in p["message"] for p in errors), errors
    hit = next(p for p in errors if words in p["message"])
    assert hit["file"] == name  # the visitor's name, never the stored copy's path
    assert hit["row"] == row and hit["field"] == field, hit
    assert str(app.runs_dir) not in summary + json.dumps(problems)  # where uploads are stored stays private
    assert app.process.poll() is None


@pytest.mark.parametrize("case,name,content,words", REFUSED_UPLOADS, ids=[c[0] for c in REFUSED_UPLOADS])
def test_refused_upload_says_why(app, client, files, tiny_llama_dir, case, name, content, words):
    path = files / name
    path.write_bytes(content)
    before = set((app.runs_dir / ".uploads").glob("*")) if (app.runs_dir / ".uploads").exists() else set()
    with pytest.raises(AppError) as refused:
        inspect(client, path, tiny_llama_dir)
    assert words in str(refused.value)
    if "limit" in words:
        assert name in str(refused.value) and "LORA_STUDIO_MAX_UPLOAD_MB" in str(refused.value)
    after = set((app.runs_dir / ".uploads").glob("*")) if (app.runs_dir / ".uploads").exists() else set()
    assert after == before  # nothing refused is kept
    assert app.process.poll() is None


def test_gradio_refuses_a_file_over_the_upload_limit(app, files):
    """Over LORA_STUDIO_MAX_UPLOAD the upload route itself answers 413 (the browser checks first)."""
    big = files / "huge.jsonl"
    big.write_bytes(b"a" * (1024 * 1024 + 10))
    with big.open("rb") as fh:
        response = httpx.post(app.url + "gradio_api/upload", files={"files": ("huge.jsonl", fh)}, timeout=30)
    assert response.status_code == 413 and "maximum allowed size" in response.text
    assert app.process.poll() is None


# ----------------------------------------------------------------- the Train tab's Start


@pytest.fixture(scope="module")
def started(app, client, tiny_llama_dir):
    """A visitor whose Data tab holds the good example (241 rows), so only the settings are wrong."""
    summary, *_ = inspect(client, EXAMPLE, tiny_llama_dir)
    assert "ready to train" in summary
    return client


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_llama_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(Path(tiny_llama_dir) / "config.json", no_weights)
    no_tokenizer = root / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in Path(tiny_llama_dir).glob("*"):
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, no_tokenizer)
    a_file = root / "model.bin"
    a_file.write_bytes(b"\x00" * 64)
    return {"no weights": str(no_weights), "no tokenizer": str(no_tokenizer), "a file": str(a_file)}


MODEL_CASES = [
    ("model folder that does not exist", "/nonexistent/model", "does not exist"),
    ("model folder without weights", "@no weights", "has no weights"),
    ("model folder without a tokenizer", "@no tokenizer", "could not load the tokenizer"),
    ("model that is a file", "@a file", "is a file"),
    ("Hub id not cached, offline", "nobody-here/no-such-model-123", "HF_HUB_OFFLINE"),
    ("invalid Hub id", "not a model id !!", "could not load the tokenizer"),
    ("path out of the app folder", "../../..", "has no config.json"),
]


@pytest.mark.parametrize("case,model,words", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_is_refused_before_a_run_exists(app, started, model_dirs, case, model, words):
    model = model_dirs[model[1:]] if model.startswith("@") else model
    before = run_folders(app.runs_dir)
    with pytest.raises(AppError) as refused:
        started.predict(*settings(model), api_name="/start")
    assert words in str(refused.value)
    assert run_folders(app.runs_dir) == before
    # The Data tab's preview (which loads the model's tokenizer) says the same, not a traceback.
    with pytest.raises(AppError) as previewed:
        inspect(started, EXAMPLE, model)
    assert any(w in str(previewed.value) for w in (words, "could not load", "does not exist", "no weights", "is a file", "no config.json"))
    assert app.process.poll() is None


# (case, settings changed, words): the message names the setting
SETTING_CASES = [
    ("rank 0", dict(rank=0), "rank must be at least 1"),
    ("rank negative", dict(rank=-4), "rank must be at least 1"),
    ("rank empty", dict(rank=None), "rank is empty"),
    ("rank beyond memory", dict(rank=10**9), "memory estimate"),
    ("negative lr", dict(lr=-0.1), "lr must be positive"),
    ("lr 0", dict(lr=0.0), "lr must be positive"),
    ("batch larger than the data", dict(batch_size=500), "larger than the data (241 training examples)"),
    ("batch larger than the data after the validation split", dict(batch_size=240, val_fraction=0.1), "larger than the data (217 training examples)"),
    ("batch 0", dict(batch_size=0), "batch_size must be at least 1"),
    ("epochs 0", dict(epochs=0), "epochs must be positive"),
    ("epochs negative", dict(epochs=-1), "epochs must be positive"),
    ("max steps negative", dict(max_steps=-3), "max_steps must be at least 1"),
    ("dropout 1", dict(dropout=1.0), "dropout must be in [0, 1)"),
    ("warmup 1", dict(warmup_ratio=1.0), "warmup_ratio must be in [0, 1)"),
    ("negative weight decay", dict(weight_decay=-0.1), "weight_decay must be 0 or more"),
    ("alpha 0", dict(alpha=0), "alpha must be positive"),
    ("validation fraction 1", dict(val_fraction=1.0), "val_fraction must be in [0, 1)"),
    ("accumulation > batch", dict(grad_accum_steps=9, batch_size=2), "grad_accum_steps (9) cannot exceed batch_size (2)"),
    ("accumulation 0", dict(grad_accum_steps=0), "grad_accum_steps must be at least 1"),
    ("checkpoint every -1", dict(checkpoint_every=-1), "checkpoint_every must be 0 or more"),
    ("method options not JSON", dict(method_options="{x"), "method options must be JSON"),
    ("method options a list", dict(method_options="[1]"), "method options must be a JSON object"),
    ("target that matches nothing", dict(target="zzz_nomatch"), "matches no linear layer"),
    ("unknown method", dict(method="nope"), "not in the list of choices"),
    ("unknown precision", dict(precision="fp8"), "not in the list of choices"),
    ("max length under the slider", dict(max_seq_len=0), "less than minimum value 32"),
    ("token pasted as target", dict(target="hf_abcdefghijklmnopqrstuvwxyz0123"), "looks like an access token"),
]


@pytest.mark.parametrize("case,over,words", SETTING_CASES, ids=[c[0] for c in SETTING_CASES])
def test_nonsense_settings_are_refused_naming_the_setting(app, started, tiny_llama_dir, case, over, words):
    before = run_folders(app.runs_dir)
    with pytest.raises(AppError) as refused:
        started.predict(*settings(tiny_llama_dir, **over), api_name="/start")
    assert words in str(refused.value)
    assert "hf_abcdefghijklmnopqrstuvwxyz0123" not in str(refused.value)
    assert run_folders(app.runs_dir) == before
    assert app.process.poll() is None


@pytest.mark.parametrize("field", ["lr", "epochs", "weight_decay", "warmup_ratio", "rank", "batch_size"])
def test_nan_sent_over_raw_http_is_refused(app, started, tiny_llama_dir, field):
    """JSON clients cannot send NaN, raw HTTP can: refused, no run, the app keeps serving. (NaN in a
    whole-number box fails in gradio's own rounding, before our code, with a bare 'Error'.)"""
    from lora_studio.ui.train_tab import FIELDS

    values = settings(tiny_llama_dir)
    values[FIELDS.index(field)] = float("nan")
    before = run_folders(app.runs_dir)
    answer = raw_call(app, fn_index(app, "start"), [None, *values], started.session_hash)
    assert answer["success"] is False
    if field not in ("rank", "batch_size"):
        assert f"{field} must be a finite number" in answer["output"]["error"]
    assert run_folders(app.runs_dir) == before
    assert app.process.poll() is None


# ----------------------------------------------------------------- paths


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


def test_the_app_still_serves_and_trains_after_all_that(app, started, tiny_llama_dir):
    """The control: the same session, good settings, starts a real run (so the refusals above were
    for their reason, not because starting is broken)."""
    from lora_studio.runner import Runner

    assert_serving(app, started, tiny_llama_dir)
    before = run_folders(app.runs_dir)
    text = started.predict(*settings(tiny_llama_dir, max_steps=2, batch_size=4), api_name="/start")[0]
    run_id = text.split("**")[1].split(":")[0]
    status = Runner(app.runs_dir).wait(run_id, timeout=120)
    assert status["state"] == "done", status
    assert run_folders(app.runs_dir) == before | {run_id}

