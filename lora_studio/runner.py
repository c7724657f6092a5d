"""Background training runs: start, watch, stop, resume, queue. No gradio here, no torch at import.

    runner = Runner("runs")                # or Runner() -> $LORA_STUDIO_RUNS_DIR or ./runs
    run_id = runner.start(config)          # TrainConfig or dict; ValueError on invalid settings
    runner.status(run_id)                  # status.json, with a dead worker reported as failed
    runner.metrics(run_id, since=step)     # metric rows with step > since
    runner.stop(run_id, save=True)         # save=False aborts without saving
    runner.resume(run_id)                  # continue from the last checkpoint (queued if busy)
    runner.list_runs(); runner.delete(run_id); runner.poll(); runner.wait(run_id)

The run folder is the source of truth (runfiles.py lists its files): any Runner, in any
process, finds every run and its state there; nothing lives only in memory.

Processes. `start` writes RUN/config.json and a `queued` status; `poll` (also called by
`start` and `resume`) launches queued runs while fewer than `max_active` (default 1: one run
at a time on this machine's device, the CPU or all its GPUs) are active. A launch is a small
supervisor, `python -m lora_studio.supervisor supervise RUN` (supervisor.py), in its own session (spawned, never
forked: safe with CUDA; an app that dies, even by kill -9, does not take it down: the run
finishes, and a restarted app finds it running, then done). The supervisor runs the same
command a person would, `python -m lora_studio train --config RUN/config.json --gpus auto`
(`--resume RUN` to continue), which re-executes itself under torchrun with DDP when more than
one GPU is visible. Its stdout and stderr go to RUN/train.log. The supervisor touches
RUN/heartbeat every 10 s, records how the worker ended when it ended without a final status
(killed, crashed), and then launches the next queued run itself: the queue advances with no
UI open. A UI that is open calls `poll()` every second or two as well (it marks dead runs),
which covers a supervisor that was itself killed. The launching process waits for each
supervisor in a thread, so a finished one is reaped at once, never left a zombie.

States: queued -> starting -> running -> done | stopped | aborted | failed. A run counts as
alive while its supervisor, its worker or its trainer process exists (pid and start time
checked, zombies count as dead); a run recorded on another host (shared storage) is alive
while RUN/heartbeat or its status is younger than 120 s. An active run that is not alive is
reported, and written, as failed with a message that says what a resume will do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import psutil

from lora_studio import runfiles as rf
from lora_studio.config import TrainConfig

RUNS_ENV = "LORA_STUDIO_RUNS_DIR"
SUPERVISOR = "supervisor.json"
HEARTBEAT = "heartbeat"
HEARTBEAT_S = 10.0
STALE_S = 120.0
MIN_FREE_TO_START = 1 << 20  # bytes: below this the disk is full and queued runs wait


def default_runs_dir() -> Path:
    return Path(os.environ.get(RUNS_ENV) or "runs")


def pid_alive(pid: int | None, started: float | None = None) -> bool:
    """True for a live, non-zombie process; with `started`, only if it is the same process."""
    if not pid:
        return False
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def describe_exit(code: int) -> str:
    """A human sentence for a worker's exit code (negative: killed by that signal)."""
    if code < 0:
        sig = -code
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        if sig == signal.SIGKILL:
            return (
                "the training process was killed (SIGKILL). If nobody killed it, the machine ran out of "
                "memory: lower the batch size or the max sequence length, turn on gradient checkpointing, "
                "or use a 4-bit base"
            )
        if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
            return f"the training process crashed ({name}); see train.log"
        return f"the training process was ended by {name}"
    return f"the training process exited with code {code} before finishing; see train.log"


def write_interrupted(run_dir: Path, message: str, **fields: Any) -> None:
    """Mark a run that ended without a final status as failed: `message`, then what a resume will
    do. Its checkpoint step is taken from the checkpoints on disk: a worker killed between renaming
    a checkpoint into place and writing status.json leaves the status one checkpoint behind, and a
    resume continues from the newest one on disk."""
    found = rf.checkpoint_folders(run_dir)
    step = found[-1][0] if found else None
    rf.write_status(run_dir, rf.FAILED, error=f"{message} {resume_hint(step)}",
                    checkpoint_step=step, finished_at=time.time(), **fields)


def disk_free(folder: Path) -> int:
    """Bytes free under `folder` (0 when it cannot be read)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def resume_hint(step: int | None) -> str:
    """What a resume of an interrupted run whose last checkpoint is `step` will do."""
    if step:
        return f"Resume the run to continue from its last checkpoint (step {step})."
    return "No checkpoint was saved yet: a resume starts the run again from step 0."


def _log_tail(run_dir: Path, lines: int = 5) -> str:
    try:
        text = (run_dir / rf.LOG).read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(text[-lines:])


class Runner:
    """Runs under `runs_dir`, one folder each (see the module docstring)."""

    def __init__(self, runs_dir: str | Path | None = None, max_active: int = 1, gpus: str = "auto") -> None:
        self.runs_dir = Path(runs_dir) if runs_dir is not None else default_runs_dir()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.max_active = max_active
        self.gpus = gpus
        self._children: list[subprocess.Popen] = []
        self._children_lock = threading.Lock()

    # ------------------------------------------------ public API

    def start(
        self, config: TrainConfig | dict[str, Any], run_id: str | None = None, owner: str | None = None,
        max_wall_s: float | None = None,
    ) -> str:
        """Create a run folder for `config` and queue it; it starts now if the device is free.
        `owner` (who started it) and `max_wall_s` (seconds of training before the supervisor stops
        it, with a checkpoint) go to RUN/owner.json, written before the run can be seen."""
        cfg = TrainConfig.from_dict(config) if isinstance(config, dict) else config
        cfg = cfg.resolved()  # invalid settings fail here, before any folder exists
        run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}-{uuid.uuid4().hex[:6]}"
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=False)
        rf.make_reserve(run_dir)
        cfg.out = str(run_dir.resolve())
        for name in ("data", "model", "val_data", "test_data"):
            value = getattr(cfg, name, None)
            if isinstance(value, str) and value and Path(value).exists():
                setattr(cfg, name, str(Path(value).resolve()))  # the worker may run elsewhere
        cfg.save(run_dir / "config.json")
        if owner is not None or max_wall_s:
            rf.write_json_atomic(run_dir / rf.OWNER, {"owner": owner, "max_wall_s": max_wall_s or None})
        rf.write_status(
            run_dir, rf.QUEUED, run_id=run_id, method=cfg.method, model=cfg.model,
            queued_at=time.time(), resume=False, step=0, error=None,
        )
        self.poll()
        return run_id

    def resume(self, run_id: str) -> str:
        """Queue a stopped, aborted or failed run to continue from its last checkpoint."""
        run_dir = self.run_dir(run_id)
        # Under the lock that delete takes: a resume racing a delete either finds the folder
        # gone or queues it whole, never writes a status into a half-removed folder.
        with self._lock():
            if not run_dir.is_dir():
                raise FileNotFoundError(f"no run {run_id!r} under {self.runs_dir}")
            status = self._observed(run_dir, locked=True)
            if status.get("state") in (rf.QUEUED, *rf.ACTIVE_STATES):
                raise ValueError(f"run {run_id} is {status['state']}; only a finished run can be resumed")
            if status.get("state") == rf.DONE:
                raise ValueError(f"run {run_id} is done; there is nothing left to train")
            rf.clear_control(run_dir)
            rf.write_status(run_dir, rf.QUEUED, queued_at=time.time(), resume=True, error=None, finished_at=None)
        self.poll()
        return run_id

    def stop(self, run_id: str, save: bool = True) -> dict[str, Any]:
        """Ask a run to stop (save=True: keep the adapter and a checkpoint of the current step;
        False: abort). Returns at once; the worker stops before its next step and exits."""
        run_dir = self.run_dir(run_id)
        with self._lock():
            status = self._observed(run_dir)
            if status.get("state") == rf.QUEUED:
                rf.write_status(run_dir, rf.ABORTED, error=None, finished_at=time.time(), message="removed from the queue")
            elif status.get("state") in rf.ACTIVE_STATES:
                rf.request_stop(run_dir, save)
        return self.status(run_id)

    def status(self, run_id: str) -> dict[str, Any]:
        """The run's status.json as it truly is (a dead worker shows failed), with `run_id`,
        `stopping` (`stop`/`abort` while a stop request is pending) and `queue_position`."""
        run_dir = self.run_dir(run_id)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"no run {run_id!r} under {self.runs_dir}")
        self._reap()
        status = self._observed(run_dir)
        if status.get("state") == rf.QUEUED:
            queue = [r["run_id"] for r in self._queued()]
            status["queue_position"] = queue.index(run_id) + 1 if run_id in queue else None
        return status

    def metrics(self, run_id: str, since: int = 0) -> list[dict[str, Any]]:
        """Metric rows with step > since, oldest first (poll with the last step seen)."""
        return rf.read_metrics(self.run_dir(run_id), since)

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run under runs_dir, newest first, each as `status()` gives it."""
        self._reap()
        runs = []
        for run_dir in self._run_dirs():
            status = self._observed(run_dir)
            runs.append(status)
        queue = [r["run_id"] for r in sorted((r for r in runs if r.get("state") == rf.QUEUED), key=_queued_key)]
        for r in runs:
            if r.get("state") == rf.QUEUED:
                r["queue_position"] = queue.index(r["run_id"]) + 1
        return sorted(runs, key=lambda r: r.get("queued_at") or r.get("started_at") or 0, reverse=True)

    def delete(self, run_id: str) -> None:
        """Remove a run folder; refused while the run is starting or running (stop it first)."""
        run_dir = self.run_dir(run_id)
        with self._lock():
            state = self._observed(run_dir).get("state")
            if state in rf.ACTIVE_STATES:
                raise ValueError(f"run {run_id} is {state}: stop it before deleting it")
            # Final state written, supervisor not yet gone: deleting now would make it fail on the
            # missing folder before it starts the next queued run.
            sup = rf.read_json(run_dir / SUPERVISOR)
            if sup.get("host") in (None, rf.hostname()) and pid_alive(sup.get("pid"), sup.get("pid_started")):
                raise ValueError(f"run {run_id} is still finishing (its process is exiting): try again in a moment")
            shutil.rmtree(run_dir)

    def shutdown(self, timeout: float = 25.0) -> list[str]:
        """Stop every run this machine is training, saving a checkpoint of the step in flight,
        and wait up to `timeout` s for their processes to exit; returns their ids.

        For the app's own stop (a Space restart sends SIGTERM): each run's supervisor gets
        SIGTERM, forwards it to the trainer (which saves and ends `stopped`, resumable), and
        starts no queued run after it; queued runs stay queued for the next start.
        """
        signalled: list[tuple[str, int, float | None]] = []
        with self._lock():
            for run_dir in self._run_dirs():
                status = self._observed(run_dir, locked=True)
                if status.get("state") not in rf.ACTIVE_STATES:
                    continue
                sup = rf.read_json(run_dir / SUPERVISOR)
                if sup.get("host") not in (None, rf.hostname()) or not pid_alive(sup.get("pid"), sup.get("pid_started")):
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sup["pid"], signal.SIGTERM)
                    signalled.append((run_dir.name, sup["pid"], sup.get("pid_started")))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(pid_alive(pid, started) for _, pid, started in signalled):
            self._reap()
            time.sleep(0.1)
        return [run_id for run_id, _, _ in signalled]

    def poll(self) -> list[str]:
        """Reap finished children, mark dead runs failed, launch queued runs while the device
        has room. Cheap; safe to call from any thread or process at any time."""
        self._reap()
        started = []
        with self._lock():
            runs = [self._observed(d, locked=True) for d in self._run_dirs()]
            active = sum(1 for r in runs if r.get("state") in rf.ACTIVE_STATES)
            for status in sorted((r for r in runs if r.get("state") == rf.QUEUED), key=_queued_key):
                if active >= self.max_active or disk_free(self.runs_dir) < MIN_FREE_TO_START:
                    break  # a full disk: queued runs wait for space rather than fail at once
                try:
                    self._launch(self.run_dir(status["run_id"]), resume=bool(status.get("resume")))
                except OSError as e:
                    if e.errno in rf.DISK_FULL:
                        break
                    raise
                started.append(status["run_id"])
                active += 1
        return started

    def wait(self, run_id: str, timeout: float | None = None, poll_s: float = 0.2) -> dict[str, Any]:
        """Block until the run reaches a final state (or the timeout); returns its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(run_id)
            if status.get("state") in rf.FINAL_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {status.get('state')} after {timeout} s")
            self.poll()
            time.sleep(poll_s)

    def log(self, run_id: str, max_chars: int = 20000) -> str:
        """The end of the worker's stdout/stderr (RUN/train.log)."""
        path = self.run_dir(run_id) / rf.LOG
        if not path.exists():
            return ""
        text = path.read_text(errors="replace")
        return text[-max_chars:]

    def run_dir(self, run_id: str) -> Path:
        """The folder of `run_id`; ids that could leave runs_dir are refused."""
        if not rf.valid_run_id(run_id):
            raise ValueError(f"invalid run id {run_id!r}")
        path = self.runs_dir / run_id
        # A symlinked run folder would let status/delete/resume read or write outside runs_dir.
        if path.is_symlink() or (path.exists() and path.resolve().parent != self.runs_dir.resolve()):
            raise ValueError(f"invalid run id {run_id!r}: its folder is a link out of {self.runs_dir}")
        return path

    # ------------------------------------------------ internals

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive lock on the runs folder, across threads and processes."""
        with open(self.runs_dir / ".runner.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _run_dirs(self) -> list[Path]:
        return sorted(
            d for d in self.runs_dir.iterdir()
            if d.is_dir() and not d.is_symlink() and rf.valid_run_id(d.name) and ((d / rf.STATUS).exists() or (d / "config.json").exists())
        )

    def _queued(self) -> list[dict[str, Any]]:
        runs = [rf.read_status(d) | {"run_id": d.name} for d in self._run_dirs()]
        return sorted((r for r in runs if r.get("state") == rf.QUEUED), key=_queued_key)

    def _observed(self, run_dir: Path, locked: bool = False) -> dict[str, Any]:
        status = rf.read_status(run_dir)
        status["run_id"] = run_dir.name
        if not status.get("state"):
            status["state"] = rf.FAILED
            status.setdefault("error", "the run folder has no status (created outside the runner, or damaged)")
            return status
        if status["state"] in rf.ACTIVE_STATES:
            if not self._alive(run_dir, status):
                if locked:
                    status = self._mark_dead(run_dir)
                else:
                    with self._lock():
                        status = self._mark_dead(run_dir)
            else:
                action = rf.read_control(run_dir)
                if action:
                    status["stopping"] = action
        return status

    def _mark_dead(self, run_dir: Path) -> dict[str, Any]:
        status = rf.read_status(run_dir)  # re-read under the lock: the worker may have just finished
        if status.get("state") in rf.ACTIVE_STATES and not self._alive(run_dir, status):
            message = "the training process ended without a final status (killed, crashed, or the machine restarted)."
            try:
                write_interrupted(run_dir, message)
                status = rf.read_status(run_dir)
            except OSError as e:  # a full disk: report the truth without recording it
                status.update(state=rf.FAILED, error=f"{message} It could not be recorded: {e.strerror or e}.")
        status["run_id"] = run_dir.name
        return status

    def _alive(self, run_dir: Path, status: dict[str, Any]) -> bool:
        sup = rf.read_json(run_dir / SUPERVISOR)
        host = status.get("host") or sup.get("host")
        if host and host != rf.hostname():
            stamps = [status.get("updated_at") or 0]
            with contextlib.suppress(FileNotFoundError):
                stamps.append((run_dir / HEARTBEAT).stat().st_mtime)
            return time.time() - max(stamps) < STALE_S
        return any(
            pid_alive(pid, started)
            for pid, started in (
                (sup.get("pid"), sup.get("pid_started")),
                (sup.get("worker_pid"), sup.get("worker_started")),
                (status.get("pid"), status.get("pid_started")),
            )
        )

    def _launch(self, run_dir: Path, resume: bool) -> None:
        """Start the supervisor of `run_dir` (caller holds the lock)."""
        rf.clear_control(run_dir)  # a stop request belongs to an earlier life of the run
        rf.write_status(run_dir, rf.STARTING, launched_at=time.time(), error=None, finished_at=None)
        from lora_studio.supervisor import worker_env  # (it imports this module)

        cmd = [sys.executable, "-m", "lora_studio.supervisor", "supervise", str(run_dir.resolve()), "--gpus", self.gpus,
               "--max-active", str(self.max_active)]
        if resume:
            cmd.append("--resume")
        with open(run_dir / rf.LOG, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=worker_env(), start_new_session=True, close_fds=True,
            )
        rf.write_json_atomic(
            run_dir / SUPERVISOR,
            {"pid": proc.pid, "pid_started": _create_time(proc.pid), "host": rf.hostname(), "launched_at": time.time()},
        )
        with self._children_lock:
            self._children.append(proc)
        # Wait for it the moment it exits: a finished supervisor must not stay a zombie until
        # someone happens to call the Runner again (an app with no page open would collect one
        # per run).
        threading.Thread(target=proc.wait, name=f"reap-{run_dir.name}", daemon=True).start()

    def _reap(self) -> None:
        with self._children_lock:
            self._children = [p for p in self._children if p.poll() is None]


def _queued_key(status: dict[str, Any]) -> tuple[float, str]:
    return (status.get("queued_at") or 0.0, status.get("run_id", ""))


def _create_time(pid: int) -> float | None:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).create_time()
    return None
