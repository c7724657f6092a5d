"""Who is calling (ui/identity.py), the housekeeping of public mode (ui/cleanup.py) and the caps on
Hub datasets (data/sources.py), without a launched app: fake requests, fabricated run folders."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_studio import runfiles as rf
from lora_studio.ui.identity import Identities, load_key
from lora_studio.ui.settings import AppSettings


def public(tmp_path: Path, **env: str) -> AppSettings:
    return AppSettings.from_env({"LORA_STUDIO_MODE": "public", "LORA_STUDIO_RUNS_DIR": str(tmp_path), "LORA_STUDIO_MODEL": "bundled", **env})


def request(session: str | None = None, username: str | None = None, oauth: dict | None = None):
    raw = SimpleNamespace(session={"oauth_info": oauth} if oauth else {})
    return SimpleNamespace(session_hash=session, username=username, request=raw)


def test_local_mode_callers_are_the_operator(tmp_path):
    ids = Identities(AppSettings.from_env({"LORA_STUDIO_RUNS_DIR": str(tmp_path), "LORA_STUDIO_MODEL": "bundled"}))
    for req in (request("s1"), request("s2"), None):
        caller = ids.caller(req)
        assert caller.owner == "local" and caller.admin


def test_anonymous_ids_are_per_session_signed_and_survive_a_reload(tmp_path):
    ids = Identities(public(tmp_path))
    a1, b = ids.caller(request("page-a")), ids.caller(request("page-b"))
    assert a1.owner.startswith("anon-") and b.owner.startswith("anon-") and a1.owner != b.owner
    assert not a1.admin and ids.caller(request("page-a")) == a1  # the same session, the same id
    token = ids.identify(None, request("page-a"))  # the page's first load: the id to store
    assert ids.verify(token) == a1.owner
    # A reload is a new session holding the stored token: the same owner again.
    assert ids.identify(token, request("page-a-reloaded")) == token
    assert ids.caller(request("page-a-reloaded")).owner == a1.owner
    # Forged: the bare id, a wrong signature, another server's signature. Each gets an id of its own.
    other_server = Identities(public(tmp_path / "elsewhere"))
    for forged in (a1.owner, f"{a1.owner}.{'0' * 64}", other_server.sign(a1.owner), "local", 42, None):
        assert ids.verify(forged) is None
        fresh = ids.identify(forged, request(f"forger-{forged!r}"))
        assert ids.verify(fresh) != a1.owner and ids.caller(request(f"forger-{forged!r}")).owner != a1.owner


def test_the_key_is_kept_private_in_the_runs_folder_or_taken_from_the_environment(tmp_path):
    settings = public(tmp_path)
    key = load_key(settings)
    path = tmp_path / ".owner-key"
    assert load_key(settings) == key and len(key) == 32 and (path.stat().st_mode & 0o777) == 0o600
    assert load_key(public(tmp_path, LORA_STUDIO_SECRET="operator-secret")) == b"operator-secret"
    # A restarted app keeps visitors' ids: the same key, the same verdicts.
    token = Identities(settings).sign("anon-abc")
    assert Identities(settings).verify(token) == "anon-abc"


def test_signed_in_users_login_users_and_admins(tmp_path):
    space = {"SPACE_ID": "me/studio", "SYSTEM": "spaces", "OAUTH_CLIENT_ID": "id", "LORA_STUDIO_ADMINS": "boss,ana"}
    ids = Identities(public(tmp_path, **space))
    info = {"userinfo": {"preferred_username": "zoe"}, "access_token": "hf_oauthTokenOfZoe0123", "expires_at": time.time() + 60}
    zoe = ids.caller(request("s", oauth=info))
    assert (zoe.owner, zoe.admin, zoe.hub_user, zoe.hub_token) == ("hf:zoe", False, "zoe", "hf_oauthTokenOfZoe0123")
    assert "hf_oauth" not in repr(zoe)  # never printed
    boss = ids.caller(request("t", oauth={**info, "userinfo": {"preferred_username": "boss"}}))
    assert boss.admin and boss.owns("anon-anyone")
    expired = ids.caller(request("u", oauth={**info, "expires_at": time.time() - 1}))
    assert expired.owner.startswith("anon-") and expired.hub_token is None
    assert ids.caller(request("v", username="ana")).admin  # a password login listed as admin
    # Without OAuth configured (not a Space), a session's oauth_info is not believed.
    plain = Identities(public(tmp_path))
    assert plain.caller(request("w", oauth=info)).owner.startswith("anon-")


def _run(runs: Path, run_id: str, owner: str | None, state: str, age_s: float, now: float) -> Path:
    folder = runs / run_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"data": str(runs / ".uploads" / f"{run_id}.jsonl")}))
    rf.write_status(folder, state, finished_at=now - age_s)
    if owner:
        rf.write_json_atomic(folder / rf.OWNER, {"owner": owner})
    return folder


def test_cleanup_removes_old_anonymous_runs_old_merged_exports_and_unused_uploads(tmp_path):
    from lora_studio.ui.cleanup import clean
    from lora_studio.ui.common import Studio

    studio = Studio(public(tmp_path))
    runs, now, day = tmp_path, time.time(), 86400
    (runs / ".uploads").mkdir()
    _run(runs, "anon-old", "anon-1", "done", 8 * day, now)
    _run(runs, "anon-new", "anon-1", "done", 1 * day, now)
    _run(runs, "anon-queued", "anon-1", "queued", 8 * day, now)
    signed_in = _run(runs, "hf-old", "hf:zoe", "stopped", 30 * day, now)
    (signed_in / "merged").mkdir()
    os.utime(signed_in / "merged", (now - 2 * day, now - 2 * day))
    for name in ("anon-old.jsonl", "hf-old.jsonl", "orphan.jsonl", "fresh-orphan.jsonl"):
        (runs / ".uploads" / name).write_text("{}\n")
        if name != "fresh-orphan.jsonl":
            os.utime(runs / ".uploads" / name, (now - 9 * day, now - 9 * day))
    removed = clean(studio, keep_s=7 * day, now=now)
    assert sorted(removed) == sorted(["anon-old", "hf-old/merged", ".uploads/anon-old.jsonl", ".uploads/orphan.jsonl"])
    left = {p.name for p in runs.iterdir() if not p.name.startswith(".")}
    assert left == {"anon-new", "anon-queued", "hf-old"}
    assert {p.name for p in (runs / ".uploads").iterdir()} == {"hf-old.jsonl", "fresh-orphan.jsonl"}
    # bake-offs: an old anonymous one whose runs are gone goes; one with a run left, a new one, a signed-in one stay
    for name, owner, age, run in [("bk-old", "anon-1", 8, "anon-old"), ("bk-run-left", "anon-1", 8, "anon-new"),
                                  ("bk-new", "anon-1", 1, "anon-old"), ("bk-hf", "hf:zoe", 30, "anon-old")]:  # fmt: skip
        (runs / ".bakeoffs" / name).mkdir(parents=True)
        rf.write_json_atomic(runs / ".bakeoffs" / name / "bakeoff.json",
                             {"owner": owner, "created_at": now - age * day, "runs": {"lora": run}})  # fmt: skip
    assert clean(studio, keep_s=7 * day, now=now) == [".bakeoffs/bk-old"]
    assert {p.name for p in (runs / ".bakeoffs").iterdir()} == {"bk-run-left", "bk-new", "bk-hf"}


class _Stream:
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_public_hub_datasets_are_streamed_without_a_token_and_capped(monkeypatch):
    import datasets

    from lora_studio.data.problems import DataError
    from lora_studio.data.sources import read_source

    calls = []
    rows = [{"instruction": f"q{i}", "output": "a" * 100} for i in range(50)]

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, split, kwargs))
        return _Stream(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("LORA_STUDIO_MODE", "public")
    monkeypatch.setenv("LORA_STUDIO_MAX_HUB_ROWS", "40")
    with pytest.raises(DataError, match=r"more than 40 rows, this server's limit \(LORA_STUDIO_MAX_HUB_ROWS\)"):
        read_source("hub:owner/big@train")
    assert calls[-1] == ("owner/big", "train", {"streaming": True, "token": False})
    assert len(read_source("hub:owner/big@train[:30]").rows) == 30  # the first rows fit
    monkeypatch.setenv("LORA_STUDIO_MAX_HUB_ROWS", "0")
    monkeypatch.setenv("LORA_STUDIO_MAX_HUB_MB", "0.002")
    with pytest.raises(DataError, match=r"over 0.002 MB, this server's limit \(LORA_STUDIO_MAX_HUB_MB\)"):
        read_source("hub:owner/big@train")
    monkeypatch.setenv("LORA_STUDIO_MAX_HUB_MB", "0")
    assert len(read_source("hub:owner/big@train").rows) == 50
