"""Endurance in ONE app process (`python app.py`): consecutive runs and chats leave no process
behind and do not grow its memory; many visitor sessions do not either. The loop is the one
scripts/soak.py runs for longer and tabulates (figures in docs/reliability.md).

Tolerances, from measurements on this machine (docs/reliability.md, "App process"):
- RSS after cycle 4 vs after cycle 2 (cycle 1 loads the chat stack once), with the app keeping
  2 visitor sessions so that only runs and chats count (sessions: the second test): measured
  -2.1 to +1.6 MiB in four soaks (the allocator moves in steps of about 2.5 MiB). The bound is
  12 MiB, under half of one copy of the soak model's weights (28 MiB): a chat model never
  freed (one a cycle, +56 MiB by cycle 4) fails it, the allocator's steps do not.
- Sessions: gradio keeps each visitor session's server state (about 0.32 MiB for this app)
  until its cap, 10 000 sessions by default (3 GiB). Measured from visitor 50 to 300: +79.5
  MiB with gradio's cap, +0.1 MiB with ours (`LORA_STUDIO_MAX_SESSIONS`, here 5); the bound
  is 20 MiB, a quarter of the uncapped growth.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.soak import app_sample, model_weights_mib, small_model, soak
from tests.ui.conftest import launch_app, stop_app

RSS_TOLERANCE_MIB = 12.0
SESSIONS = 300
SESSION_TOLERANCE_MIB = 20.0


@pytest.fixture(scope="module")
def soak_model(tmp_path_factory) -> str:
    return small_model(tmp_path_factory.mktemp("soak-model"))


def test_runs_and_chats_leave_no_process_and_no_memory_growth(soak_model, tmp_path):
    assert model_weights_mib(soak_model) > 2 * RSS_TOLERANCE_MIB  # a leaked model could not hide in the margin
    app = launch_app(tmp_path / "runs", soak_model, tmp_path / "app.log", {"LORA_STUDIO_MAX_SESSIONS": "2"})
    try:
        samples = soak(app.url, app.process.pid, soak_model, cycles=4, steps=4)
    finally:
        stop_app(app)
    table = "\n".join(
        f"{s.cycle}: {s.rss_mib:.1f} MiB, {s.children} children, {s.zombies} zombies, {s.fds} fds" for s in samples
    )
    assert all(s.state == "finished" for s in samples)
    assert [s.children for s in samples] == [0] * 4, table  # every run's supervisor and worker ended
    assert [s.zombies for s in samples] == [0] * 4, table  # ... and was reaped by the app
    assert samples[-1].fds <= samples[1].fds + 2, table  # no file or socket left open per cycle
    assert samples[-1].threads <= samples[1].threads + 1, table
    assert samples[-1].rss_mib - samples[1].rss_mib < RSS_TOLERANCE_MIB, table


def visit(url: str, session: str) -> str:
    """One page load's status request, as a browser makes it (each tab has its own session)."""
    body = json.dumps({"data": [None], "session_hash": session}).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url + "gradio_api/run/attach", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"][1]


def test_visitor_sessions_are_capped(tiny_llama_dir, tmp_path):
    app = launch_app(tmp_path / "runs", tiny_llama_dir, tmp_path / "app.log", {"LORA_STUDIO_MAX_SESSIONS": "5"})
    try:
        rss = {}
        for n in range(1, SESSIONS + 1):
            assert "No run yet" in visit(app.url, f"visitor-{n}")
            if n in (50, SESSIONS):
                rss[n] = app_sample(app.process.pid)[0]
    finally:
        stop_app(app)
    assert rss[SESSIONS] - rss[50] < SESSION_TOLERANCE_MIB, rss
