"""The machine going down and the runs folder under concurrent hands.

* SIGTERM to the app (a Space restart, `docker stop`): the running run saves a checkpoint of
  the step it reached and ends `stopped` (resumable); a queued run stays queued; the app exits.
* Resume and delete take the same lock: a resume waits for a delete in progress, then finds
  no run; it never writes into a half-removed folder.
* The worker's output reaches train.log redacted.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading

from lora_studio import runfiles as rf
from lora_studio.engine.checkpoint import latest_checkpoint
from lora_studio.config import TrainConfig
from lora_studio.runner import Runner, pid_alive
from tests.helpers import kill_run_processes, run_pids, wait_for
from tests.ui.conftest import launch_app, stop_app


def _cfg(data, model, steps: int, **over) -> TrainConfig:
    return TrainConfig(data=str(data), out="unused", model=model, max_steps=steps, batch_size=2, max_seq_len=64,
                       precision="fp32", **over)


def test_sigterm_to_the_app_checkpoints_the_step_reached_and_keeps_the_queue(tmp_path, tiny_llama_dir, train_file):
    root = tmp_path / "runs"
    runner = Runner(root)
    app = launch_app(root, tiny_llama_dir, tmp_path / "app.log")
    try:
        long_run = runner.start(_cfg(train_file, tiny_llama_dir, 100_000, checkpoint_every=10_000))
        queued = runner.start(_cfg(train_file, tiny_llama_dir, 2))
        wait_for(lambda: runner.status(long_run).get("step", 0) >= 3, 120, "three steps")
        assert runner.status(queued)["state"] == rf.QUEUED

        os.kill(app.process.pid, signal.SIGTERM)
        app.process.wait(timeout=60)

        status = runner.status(long_run)
        assert status["state"] == rf.STOPPED, status
        assert status["step"] >= 3 and status.get("checkpoint_step") == status["step"]
        folder = latest_checkpoint(root / long_run)
        assert folder is not None and folder.name == f"step-{status['step']:06d}"
        assert not any(pid_alive(p, t) for p, t in run_pids(root / long_run))
        assert runner.status(queued)["state"] == rf.QUEUED  # not started on a machine going down
        assert "SIGTERM: stopped 1 run(s)" in app.log_text()
    finally:
        if app.process.poll() is None:
            stop_app(app)
        kill_run_processes(root)


def test_resume_waits_for_a_delete_in_progress_then_finds_no_run(tmp_path):
    runner = Runner(tmp_path / "runs")
    run_dir = runner.runs_dir / "r1"
    run_dir.mkdir()
    rf.write_status(run_dir, rf.STOPPED, run_id="r1", step=4)
    outcome: list[BaseException | str] = []

    def resume() -> None:
        try:
            outcome.append(runner.resume("r1"))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome.append(e)

    with runner._lock():  # a delete holds the lock while it removes the folder
        worker = threading.Thread(target=resume)
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and not outcome, "resume did not wait for the runs lock"
        assert rf.read_status(run_dir)["state"] == rf.STOPPED
        for p in run_dir.iterdir():
            p.unlink()
        run_dir.rmdir()
    worker.join(10)
    assert isinstance(outcome[0], FileNotFoundError), outcome
    assert not run_dir.exists()


def test_the_worker_s_output_reaches_train_log_redacted(tmp_path, monkeypatch, tiny_llama_dir, train_file):
    token = "hf_" + "AbCdEfGh0123456789xyzXYZ"
    site = tmp_path / "site"
    site.mkdir()
    # Only the worker runs supervised: the line comes from the training process itself.
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os, sys
        if os.environ.get("LORA_STUDIO_SUPERVISED"):
            print("a library quoting a URL: https://huggingface.co/x?token={token}", flush=True)
            print("Authorization: Bearer {token}", file=sys.stderr, flush=True)
    """))
    monkeypatch.setenv("PYTHONPATH", str(site))
    root = tmp_path / "runs"
    runner = Runner(root)
    try:
        run_id = runner.start(_cfg(train_file, tiny_llama_dir, 1))
        status = runner.wait(run_id, timeout=120)
        assert status["state"] == rf.DONE, status
        log = runner.log(run_id)
        assert "a library quoting a URL" in log and "hf_***" in log  # the lines came through
        assert token not in log and token[3:] not in log
    finally:
        kill_run_processes(root)


def test_copy_redacted_keeps_every_line_and_redacts_each():
    import io

    from lora_studio.supervisor import _copy_redacted

    text = b"step 1 loss 2.0\nhf_AbCdEfGh0123456789 leaked\nno newline at the end"
    sink = io.BytesIO()
    _copy_redacted(io.BytesIO(text), sink)
    assert sink.getvalue().decode() == "step 1 loss 2.0\nhf_*** leaked\nno newline at the end"
