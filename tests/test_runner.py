"""The background runner: real worker processes on the tiny model, and the run-folder rules
(liveness, queue, paths) on fabricated folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_studio import runfiles as rf
from lora_studio.runner import Runner
from tests.conftest import format_rows, write_jsonl
from tests.helpers import fake_checkpoints, kill_run_processes, wait_for


@pytest.fixture
def runs(tmp_path):
    """A runs folder; every process a test left behind is killed (by its recorded pid) at the end."""
    root = tmp_path / "runs"
    yield root
    kill_run_processes(root)


def config(model_dir: str, data: Path, **kw) -> dict:
    base = dict(data=str(data), model=model_dir, rank=4, batch_size=4, checkpoint_every=0, eval_every=0, dropout=0.1)
    base.update(kw)
    return base




def file_state(runs: Path, run_id: str) -> str | None:
    """The state in status.json, read without a Runner (no poll, no launching)."""
    return rf.read_status(runs / run_id).get("state")


def test_start_watch_stop_find_resume_equals_uninterrupted_and_queue(tiny_llama_dir, train_file, runs):
    runner = Runner(runs)
    cfg = config(tiny_llama_dir, train_file, epochs=10)  # 60 steps
    a = runner.start(cfg)
    b = runner.start(cfg)  # the same run, never interrupted: the reference
    assert runner.status(a)["state"] in ("starting", "running")
    queued = runner.status(b)
    assert queued["state"] == "queued" and queued["queue_position"] == 1  # one run at a time

    first = wait_for(lambda: runner.metrics(a), what="first metrics")
    grown = wait_for(lambda: [r for r in runner.metrics(a, since=first[-1]["step"])], what="more metrics")
    assert grown[0]["step"] > first[-1]["step"]
    assert runner.stop(a)["stopping"] == "stop"
    stopped = runner.wait(a, timeout=120)
    assert stopped["state"] == "stopped" and 0 < stopped["step"] < 60
    assert (runs / a / "adapter" / "adapter_model.safetensors").exists()

    # A fresh runner (a reloaded page, a restarted app) finds both runs from the folder alone.
    fresh = Runner(runs)
    found = {r["run_id"]: r for r in fresh.list_runs()}
    assert found[a]["state"] == "stopped" and found[a]["step"] == stopped["step"]
    assert found[b]["state"] in ("queued", "starting", "running", "done")

    # The finished run's supervisor started the queued one: no poll() from a UI needed.
    wait_for(lambda: file_state(runs, b) in ("running", "done"), what="queued run to start")
    assert rf.read_status(runs / b)["started_at"] >= stopped["finished_at"] - 1

    assert fresh.resume(a) == a
    assert fresh.wait(a, timeout=240)["state"] == "done"
    assert fresh.wait(b, timeout=240)["state"] == "done"
    steps = [r["step"] for r in fresh.metrics(a)]
    assert steps == list(range(1, 61))
    assert [r["loss"] for r in fresh.metrics(a)] == [r["loss"] for r in fresh.metrics(b)]
    assert "starting" in fresh.log(a) and "resuming" in fresh.log(a)


def test_killed_worker_is_failed_with_a_message_and_resumes(tiny_llama_dir, train_file, runs):
    runner = Runner(runs)
    run_id = runner.start(config(tiny_llama_dir, train_file, epochs=500, checkpoint_every=3))
    status = wait_for(lambda: (s := runner.status(run_id)).get("checkpoint_step") and s, what="a checkpoint")
    os.kill(status["pid"], signal.SIGKILL)
    failed = runner.wait(run_id, timeout=60)
    assert failed["state"] == "failed"
    assert "killed" in failed["error"] and "SIGKILL" in failed["error"]
    assert [r["state"] for r in Runner(runs).list_runs()] == ["failed"]  # never "running"

    checkpoint = rf.read_status(runs / run_id)["checkpoint_step"]
    runner.resume(run_id)
    wait_for(lambda: runner.status(run_id).get("resumed_from") == checkpoint and runner.status(run_id)["step"] > checkpoint + 1,
             what="resumed steps", context=lambda: f"status {runner.status(run_id)}, log:\n{runner.log(run_id)[-3000:]}")
    runner.stop(run_id, save=False)
    assert runner.wait(run_id, timeout=60)["state"] == "aborted"
    steps = [r["step"] for r in runner.metrics(run_id)]
    assert steps == list(range(1, len(steps) + 1))  # continued from the checkpoint: no gap, no repeat


def test_bad_data_run_fails_with_the_validation_message(tiny_llama_dir, tmp_path, runs):
    rows = format_rows(4)
    rows[2]["instruction"] = 7
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    runner = Runner(runs)
    run_id = runner.start(config(tiny_llama_dir, bad))
    status = runner.wait(run_id, timeout=120)
    assert status["state"] == "failed"
    assert "row 3" in status["error"] and "'instruction'" in status["error"] and "expected text" in status["error"]
    assert "starting" in runner.log(run_id)  # the worker's output is kept in the run folder


def test_invalid_settings_are_refused_before_any_folder(runs, train_file):
    runner = Runner(runs)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        runner.start({"data": str(train_file), "rank": 0})
    assert runner.list_runs() == []


def fake_run(runs: Path, run_id: str, **status) -> Path:
    run_dir = runs / run_id
    run_dir.mkdir(parents=True)
    rf.write_status(run_dir, status.pop("state"), run_id=run_id, **status)
    return run_dir


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_whose_process_died_is_failed_not_running(runs):
    run_dir = fake_run(runs, "gone", state="running", pid=dead_pid(), host=rf.hostname(), step=9, checkpoint_step=4)
    # Killed while step 9's checkpoint was being written, and step 8's had been renamed into place
    # before status.json said so: the status must follow the complete checkpoints on disk.
    fake_checkpoints(run_dir, complete=[4, 8], cut_short=(9,))
    status = Runner(runs).status("gone")
    assert status["state"] == "failed" and "ended without a final status" in status["error"]
    assert "step 8" in status["error"] and status["checkpoint_step"] == 8
    assert rf.read_status(runs / "gone")["state"] == "failed"  # written, not only reported


def test_a_run_that_died_before_any_checkpoint_says_a_resume_starts_again(runs):
    fake_run(runs, "early", state="running", pid=dead_pid(), host=rf.hostname(), step=2)
    status = Runner(runs).status("early")
    assert status["state"] == "failed" and "starts the run again from step 0" in status["error"]


def test_a_live_process_keeps_its_run_running_and_can_be_asked_to_stop(runs):
    import psutil

    me = psutil.Process()
    fake_run(runs, "alive", state="running", pid=me.pid, pid_started=me.create_time(), host=rf.hostname())
    runner = Runner(runs)
    assert runner.status("alive")["state"] == "running"
    assert runner.stop("alive", save=False)["stopping"] == "abort"
    assert rf.read_control(runs / "alive") == "abort"
    with pytest.raises(ValueError, match="stop it before deleting"):
        runner.delete("alive")
    # The same pid with another start time is another process: the run is dead.
    rf.write_status(runs / "alive", "running", pid_started=me.create_time() - 1000)
    assert runner.status("alive")["state"] == "failed"


def test_runs_on_another_host_are_judged_by_their_heartbeat(runs):
    fake_run(runs, "fresh", state="running", pid=1, host="elsewhere")
    fake_run(runs, "stale", state="running", pid=1, host="elsewhere")
    stale = rf.read_status(runs / "stale")
    stale["updated_at"] = time.time() - 600
    rf.write_json_atomic(runs / "stale" / rf.STATUS, stale)
    runner = Runner(runs)
    assert runner.status("fresh")["state"] == "running"
    assert runner.status("stale")["state"] == "failed"


def test_queue_order_stop_and_delete_without_processes(runs, train_file):
    runner = Runner(runs, max_active=0)  # nothing may start: the queue only
    first = runner.start({"data": str(train_file)}, run_id="first")
    second = runner.start({"data": str(train_file)}, run_id="second")
    assert [runner.status(r)["queue_position"] for r in (first, second)] == [1, 2]
    assert runner.stop(first)["state"] == "aborted"
    assert runner.status(second)["queue_position"] == 1
    runner.delete(first)
    assert [r["run_id"] for r in runner.list_runs()] == ["second"]
    with pytest.raises(ValueError, match="only a finished run"):
        runner.resume(second)


@pytest.mark.parametrize("bad", ["../escape", "a/b", "/abs", ".hidden", "", "x" * 200])
def test_run_ids_cannot_leave_the_runs_folder(runs, bad):
    with pytest.raises(ValueError, match="invalid run id"):
        Runner(runs).run_dir(bad)


def test_runner_imports_neither_gradio_nor_torch():
    code = "import sys, lora_studio.runner, lora_studio.supervisor; print(sorted(m for m in ('gradio', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_stop_pressed_while_the_worker_starts_is_honoured(tiny_llama_dir, train_file, runs):
    runner = Runner(runs)
    run_id = runner.start(config(tiny_llama_dir, train_file, epochs=500))
    assert runner.status(run_id)["state"] in ("starting", "running")
    runner.stop(run_id)  # before the worker has loaded anything
    status = runner.wait(run_id, timeout=120)
    assert status["state"] == "stopped" and status["step"] == 0
    assert not (runs / run_id / "adapter").exists()  # nothing trained, nothing to save


def test_the_wall_time_cap_stops_a_run_with_a_checkpoint_and_says_why(tiny_llama_dir, train_file, runs):
    """A run given `max_wall_s` (public mode's LORA_STUDIO_MAX_WALL_S) is stopped by its supervisor
    once that much time has passed: the same stop a visitor asks for (a checkpoint of the step
    reached, the adapter), and its status names the cap."""
    runner = Runner(runs)
    run_id = runner.start(config(tiny_llama_dir, train_file, epochs=10_000, lr=1e-3), owner="anon-x", max_wall_s=15)
    assert rf.read_owner(runs / run_id) == "anon-x"
    runner.wait(run_id, timeout=180)
    # The reason is written by the supervisor as the worker exits (and marked when it asked the stop).
    status = wait_for(lambda: (s := rf.read_status(runs / run_id)).get("message") and s, timeout=30, what="the cap message")
    assert status["state"] == "stopped", status
    assert status.get("capped") == "wall_s" and "time limit of 15 s per run (LORA_STUDIO_MAX_WALL_S)" in status["message"]
    assert f"checkpoint of step {status['step']}" in status["message"] and status["step"] >= 1
    assert rf.checkpoint_folders(runs / run_id)[-1][0] == status["step"]
    assert (runs / run_id / "adapter" / "adapter_config.json").exists()


def test_a_run_without_owner_or_cap_has_no_owner_file(runs, train_file):
    runner = Runner(runs, max_active=0)
    run_id = runner.start({"data": str(train_file), "model": "bundled"})
    assert not (runs / run_id / rf.OWNER).exists() and rf.read_owner(runs / run_id) is None


def test_public_mode_workers_get_an_allow_listed_environment(monkeypatch):
    from lora_studio.supervisor import worker_env

    planted = {"HF_TOKEN": "hf_planted0123456789", "HUGGING_FACE_HUB_TOKEN": "hf_planted0123456789",
               "AWS_SECRET_ACCESS_KEY": "k", "OAUTH_CLIENT_SECRET": "s", "LORA_STUDIO_SECRET": "s",
               "HF_HOME": "/data/hf", "LC_ALL": "C.UTF-8", "CUDA_VISIBLE_DEVICES": "0"}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LORA_STUDIO_MODE", "local")
    local = worker_env()
    assert local["HF_TOKEN"] == planted["HF_TOKEN"]  # local mode: the operator's own token still works
    monkeypatch.setenv("LORA_STUDIO_MODE", "public")
    env = worker_env()
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "OAUTH_CLIENT_SECRET", "LORA_STUDIO_SECRET"} & set(env)
    assert (env["HF_HOME"], env["LC_ALL"], env["CUDA_VISIBLE_DEVICES"]) == ("/data/hf", "C.UTF-8", "0")
    assert env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] == "1" and env["HF_TOKEN_PATH"] == os.devnull
    assert env["LORA_STUDIO_MODE"] == "public" and env["PATH"] and env["PYTHONUNBUFFERED"] == "1"
