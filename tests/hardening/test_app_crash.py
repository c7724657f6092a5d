"""kill -9 of the app process (`python app.py`) in the middle of a training started through
its API, then the app restarted on the same runs folder.

Intended behaviour (runner.py): a run's supervisor and worker live in their own session, so
the app dying does not take the training down. It carries on with no app (and a run that
ends with no app writes `done` by itself); a restarted app shows it `running` with its step
moving, can stop it, and a run queued on the restarted app starts after it. When the training
processes die with the app (the machine or the container goes down: kill -9 of the app and of
the run's process group), status.json still says `running` and only the restarted app can
tell: it shows `failed` with resume advice, the last checkpoint loads, and a resume through
the API finishes with the losses of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file

from lora_studio import runfiles as rf
from lora_studio.engine.checkpoint import latest_checkpoint, load_checkpoint
from lora_studio.config import TrainConfig
from lora_studio.runner import SUPERVISOR, pid_alive
from lora_studio.engine.run import train
from tests.soak import EXAMPLE, train_settings, wait_status
from tests.helpers import fake_checkpoints, kill_run_processes, run_pids
from tests.ui.conftest import LaunchedApp, launch_app, stop_app




@pytest.fixture
def runs(tmp_path):
    """A runs folder; apps and training processes a test leaves behind are killed (by pid) at the end."""
    root = tmp_path / "runs"
    apps: list[LaunchedApp] = []
    yield root, apps
    for app in apps:
        if app.process.poll() is None:
            stop_app(app)
    kill_run_processes(root)


def launch(runs, model: str, name: str) -> LaunchedApp:
    root, apps = runs
    app = launch_app(root, model, root.parent / f"{name}.log")
    apps.append(app)
    return app


def start_run(app: LaunchedApp, model: str, steps: int, **over) -> str:
    client = Client(app.url, verbose=False)
    client.predict(handle_file(str(EXAMPLE)), None, "", "auto", "", "", model, 128, api_name="/inspect_data")
    text = client.predict(*train_settings(model, steps, **over), api_name="/start")[0]
    return re.match(r"\*\*(\S+): ", text).group(1)


def wait_file(run_dir: Path, predicate, timeout: float = 120, what: str = "status") -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = rf.read_status(run_dir)
        if predicate(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last status {rf.read_status(run_dir)}")


def kill_app(app: LaunchedApp) -> None:
    os.kill(app.process.pid, signal.SIGKILL)
    assert app.process.wait(timeout=30) == -signal.SIGKILL


def runs_row(client: Client, run_id: str) -> dict:
    table = client.predict([], None, api_name="/runs")[0]
    return dict(zip(table["headers"], next(r for r in table["data"] if r[0] == run_id)))


def test_app_killed_training_carries_on_and_the_restarted_app_follows_it(runs, tiny_llama_dir):
    root, _ = runs
    app = launch(runs, tiny_llama_dir, "app1")
    long_run = start_run(app, tiny_llama_dir, 100_000, checkpoint_every=5)  # ends only when stopped
    run_dir = root / long_run
    wait_file(run_dir, lambda s: s.get("checkpoint_step"), what="a first checkpoint")

    kill_app(app)
    procs = run_pids(run_dir)
    assert len(procs) == 3 and all(pid_alive(p, t) for p, t in procs)  # supervisor, worker (= trainer)
    step = rf.read_status(run_dir)["step"]
    wait_file(run_dir, lambda s: s.get("step", 0) > step + 2, what="steps with no app")

    # The restarted app shows the run as it is: running, its step moving, and controls it.
    app2 = launch(runs, tiny_llama_dir, "app2")
    watcher = Client(app2.url, verbose=False)
    assert runs_row(watcher, long_run)["state"] == "running"
    text = watcher.predict(api_name="/attach")[0]  # the page's view: the active run
    seen = int(re.search(rf"\*\*{long_run}: training\*\*, step (\d+) of", text)[1])
    wait_status(watcher, rf"\*\*{long_run}: training\*\*, step (?!{seen}\b)\d+ of", 60)
    short_run = start_run(app2, tiny_llama_dir, 12, checkpoint_every=4)
    assert rf.read_status(root / short_run)["state"] == "queued"  # the orphaned run still holds the device
    watcher.predict(api_name="/stop")
    stopped = wait_file(run_dir, lambda s: s.get("state") in rf.FINAL_STATES, what="the stop")
    assert stopped["state"] == "stopped" and stopped["error"] is None
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert [r["step"] for r in rf.read_metrics(run_dir)] == list(range(1, stopped["step"] + 1))

    # The queued run starts after it; the app dies again and the run finishes with no app.
    wait_file(root / short_run, lambda s: s.get("state") != "queued", what="the queued run's launch")
    kill_app(app2)
    killed_at = time.time()
    done = wait_file(root / short_run, lambda s: s.get("state") in rf.FINAL_STATES, what="the second run's end")
    assert done["state"] == "done" and done["step"] == 12 and done["finished_at"] > killed_at
    assert [r["step"] for r in rf.read_metrics(root / short_run)] == list(range(1, 13))

    app3 = launch(runs, tiny_llama_dir, "app3")
    client = Client(app3.url, verbose=False)
    assert runs_row(client, long_run)["state"] == "stopped" and runs_row(client, short_run)["state"] == "done"
    assert f"**{short_run}: finished** after 12 steps" in client.predict(api_name="/attach")[0]
    for run in (long_run, short_run):  # nothing left running from the killed apps' runs
        for pid, started in run_pids(root / run):
            deadline = time.monotonic() + 30
            while pid_alive(pid, started) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not pid_alive(pid, started), f"{run}: pid {pid} still alive"
        assert "worker exited with code 0" in (root / run / rf.LOG).read_text()


def test_app_and_training_killed_together_are_failed_then_resume_through_the_api(runs, tiny_llama_dir, tmp_path):
    root, _ = runs
    steps = 40
    app = launch(runs, tiny_llama_dir, "app1")
    run_id = start_run(app, tiny_llama_dir, steps, checkpoint_every=4, dropout=0.1)
    run_dir = root / run_id
    wait_file(run_dir, lambda s: (s.get("checkpoint_step") or 0) >= 8, what="two checkpoints")

    # The machine goes down: the app and the run's whole process group (supervisor, worker).
    sup = rf.read_json(run_dir / SUPERVISOR)
    procs = run_pids(run_dir)
    kill_app(app)
    os.killpg(os.getpgid(sup["pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(pid_alive(p, t) for p, t in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p, t) for p, t in procs)
    on_disk = rf.read_status(run_dir)
    assert on_disk["state"] == "running", "nobody was left to record the end: only a restart can tell"
    assert on_disk["step"] < steps
    checkpoint = on_disk["checkpoint_step"]
    # The last complete checkpoint is the one status.json names, or a later one when the kill fell
    # between a save and its status line; a save the kill cut short is not listed.
    folder = latest_checkpoint(run_dir)
    latest = int(folder.name.split("-")[1])
    assert latest in (checkpoint, checkpoint + 4)

    app2 = launch(runs, tiny_llama_dir, "app2")
    client = Client(app2.url, verbose=False)
    assert runs_row(client, run_id)["state"] == "failed"
    text = client.predict(api_name="/attach")[0]
    assert f"**{run_id}: failed**" in text and "ended without a final status" in text
    assert f"Resume the run to continue from its last checkpoint (step {latest})" in text  # the disk's, not the status's
    written = rf.read_status(run_dir)  # written back, for the CLI and other apps too
    assert written["state"] == "failed" and written["checkpoint_step"] == latest

    loaded = load_checkpoint(folder, 0, torch.device("cpu"))
    assert loaded["state"]["step"] == latest and loaded["optimizer"]["optimizer"]["state"]
    assert loaded["model"] and all(torch.isfinite(t).all() for t in loaded["model"].values())

    message = client.predict(run_id, api_name="/resume")[0]
    assert "resumes" in message
    final = wait_file(run_dir, lambda s: s.get("state") in rf.FINAL_STATES and s.get("resumed_from"), 180, "the resume")
    assert final["state"] == "done" and final["step"] == steps and final["resumed_from"] == latest
    assert f"**{run_id}: finished** after {steps} steps" in wait_status(client, rf"{run_id}: finished", 30)

    # Same losses as a run that was never interrupted (dropout on: the RNG state is restored too).
    rows = rf.read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    ref = TrainConfig.load(run_dir / "config.json")
    ref.out = str(tmp_path / "reference")
    assert train(ref)["state"] == "done"
    assert [r["loss"] for r in rows] == [r["loss"] for r in rf.read_metrics(tmp_path / "reference")]
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("checkpoint", [None, 6])
def test_a_run_found_dead_after_a_restart_says_what_resume_does(tmp_path, checkpoint):
    """The restart path without the app (any Runner, e.g. the CLI's `runs`): a run whose
    processes are all gone, as a machine restart leaves it."""
    import subprocess
    import sys

    from lora_studio.runner import Runner

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    rf.write_status(run_dir, rf.RUNNING, pid=dead.pid, pid_started=time.time(), step=9, checkpoint_step=checkpoint)
    if checkpoint:  # the hint follows the complete checkpoints on disk
        fake_checkpoints(run_dir, complete=[checkpoint])
    status = Runner(tmp_path / "runs").status("r1")
    assert status["state"] == "failed" and rf.read_status(run_dir)["state"] == "failed"
    if checkpoint:
        assert "Resume the run to continue from its last checkpoint (step 6)." in status["error"]
    else:
        assert "No checkpoint was saved yet: a resume starts the run again from step 0." in status["error"]
