"""The files of a run folder, read and written without torch (the runner's supervisor and the
UI's polling import only this).

    RUN/config.json     the resolved TrainConfig
    RUN/status.json     {"state", "step", "total_steps", "loss", "error", "pid", ...}; atomic writes
    RUN/metrics.jsonl   one JSON object per optimizer step (eval_loss on evaluation steps)
    RUN/control.json    written by `stop`: {"action": "stop" | "abort"}; the loop reads it each step
    RUN/train.log       the worker's stdout and stderr (runner-started runs)
    RUN/checkpoints/    the two latest good resumable checkpoints (see checkpoint.py)
    RUN/.reserve        64 KiB set aside so a full disk can still record the run's failure
    RUN/adapter/        the PEFT-format adapter, written when the run ends or is stopped
    RUN/owner.json      {"owner", "max_wall_s"}: who started the run and its caps, written once by
                        the runner at start (the app's ownership checks read it; nothing else writes it)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from lora_studio.redact import redact

STATUS = "status.json"
METRICS = "metrics.jsonl"
CONTROL = "control.json"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
RESERVE = ".reserve"
RESERVE_BYTES = 64 * 1024  # given up when the disk is full, so the run's final status still fits
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
OWNER = "owner.json"
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")

QUEUED = "queued"
STARTING = "starting"
RUNNING = "running"
DONE = "done"
STOPPED = "stopped"
ABORTED = "aborted"
FAILED = "failed"
ACTIVE_STATES = (STARTING, RUNNING)
WAITING_STATES = (QUEUED, *ACTIVE_STATES)
"""Not finished: queued, or a worker starting or training."""
FINAL_STATES = (DONE, STOPPED, ABORTED, FAILED)
ADAPTER = "adapter"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def valid_run_id(run_id: Any) -> bool:
    """A run id that names a folder inside the runs folder: letters, digits, `._-`, no `..`."""
    return isinstance(run_id, str) and bool(_RUN_ID.match(run_id)) and ".." not in run_id


def has_adapter(run_dir: str | Path) -> bool:
    """Whether the run saved its adapter (it is written when training ends or stops)."""
    return (Path(run_dir) / ADAPTER / "adapter_config.json").exists()


def adapter_dir(run_dir: str | Path) -> Path:
    """RUN/adapter; FileNotFoundError when the run has saved none."""
    if not has_adapter(run_dir):
        raise FileNotFoundError(f"{run_dir} has no saved adapter (adapter/adapter_config.json)")
    return Path(run_dir) / ADAPTER


def checkpoint_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first; state.json is written last, so a
    folder without it is a save that was cut short."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _CHECKPOINT_NAME.match(path.name)
        if m and (path / "state.json").exists():
            found.append((int(m.group(1)), path))
    return sorted(found)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write, fsync, then rename: a reader (or a power cut) sees the old file or the new one, never
    half of one."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`data` into `path` through a temporary file, fsynced, then renamed over it. The temporary
    name is unique so two writers never share one; a failed write leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: Path, prefix: str = ".tmp-") -> Iterator[Path]:
    """Yield an empty folder next to `target`; when the block succeeds it replaces `target`,
    when it fails it is removed. An interrupted save never leaves half a folder behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):  # on disk before the rename makes them visible: no empty file after a power cut
            if path.is_file():
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_status(run_dir: str | Path, state: str, **fields: Any) -> None:
    path = Path(run_dir) / STATUS
    for key in ("error", "log_tail", "message"):  # free text that may quote a token
        if key in fields:
            fields[key] = redact(fields[key])
    status = read_json(path)
    status.update(fields, state=state, updated_at=time.time())
    try:
        write_json_atomic(path, status)
    except OSError as e:
        reserve = Path(run_dir) / RESERVE
        if e.errno not in DISK_FULL or not reserve.exists():
            raise
        reserve.unlink()  # the run's own reserve: its status fits in what that frees
        write_json_atomic(path, status)


def make_reserve(run_dir: str | Path) -> None:
    """Set RUN/.reserve aside (see RESERVE_BYTES); quietly skipped when there is no room for it."""
    reserve = Path(run_dir) / RESERVE
    if reserve.exists():
        return
    try:
        with open(reserve, "wb") as fh:
            fh.write(b"\0" * RESERVE_BYTES)  # written, not sparse: the blocks are really taken
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            reserve.unlink()


def read_status(run_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / STATUS)


def read_owner(run_dir: str | Path) -> str | None:
    """Who started the run (None: a run from before owners were recorded, or made outside the runner)."""
    owner = read_json(Path(run_dir) / OWNER).get("owner")
    return owner if isinstance(owner, str) and owner else None


def read_metrics(run_dir: str | Path, since: int = 0) -> list[dict[str, Any]]:
    """Metric rows with step > since (a half-written last line is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) > since:
            rows.append(row)
    return rows


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Keep the rows up to `last_step` (a resume continues from there)."""
    path = Path(run_dir) / METRICS
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def request_stop(run_dir: str | Path, save: bool = True) -> None:
    write_json_atomic(Path(run_dir) / CONTROL, {"action": "stop" if save else "abort", "at": time.time()})


def read_control(run_dir: str | Path) -> str | None:
    """`stop`, `abort` or None. Called every step: one stat() when there is no request."""
    path = Path(run_dir) / CONTROL
    if not path.exists():
        return None
    action = read_json(path).get("action")
    return action if action in ("stop", "abort") else "stop"


def clear_control(run_dir: str | Path) -> None:
    (Path(run_dir) / CONTROL).unlink(missing_ok=True)


def hostname() -> str:
    return socket.gethostname()
