"""The supervisor of one background run: `python -m lora_studio.supervisor supervise RUN`, started
by `Runner` (runner.py) in its own session. It runs the worker (`python -m lora_studio train`) with
an allow-listed environment, copies its output to train.log with tokens redacted, keeps the
heartbeat, enforces the server's wall-time cap, records how the worker ended, then starts the
next queued run. It never imports gradio or torch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lora_studio import runfiles as rf
from lora_studio.redact import redact
from lora_studio.runner import (
    HEARTBEAT,
    HEARTBEAT_S,
    SUPERVISOR,
    Runner,
    _create_time,
    _log_tail,
    describe_exit,
    write_interrupted,
)

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


# What a worker keeps of the app's environment in public mode (LORA_STUDIO_MODE=public): where
# things are, how to use the hardware, how to reach the Hub; never a secret (HF_TOKEN, cloud keys,
# OAUTH_CLIENT_SECRET, ...), whatever the Space's settings hold.
ENV_KEEP = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "PYTHONPATH",
    "PYTHONHASHSEED", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE",
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HUB_DISABLE_TELEMETRY",
    "HF_HUB_ENABLE_HF_TRANSFER", "XDG_CACHE_HOME", "TORCH_HOME", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "TOKENIZERS_PARALLELISM", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "NCCL_DEBUG",
    "LORA_STUDIO_MODE", "LORA_STUDIO_CACHE", "LORA_STUDIO_RUNS_DIR", "LORA_STUDIO_MAX_UPLOAD_MB", "LORA_STUDIO_MAX_HUB_ROWS",
    "LORA_STUDIO_MAX_HUB_MB", "SPACE_ID", "SYSTEM",
})  # fmt: skip
ENV_KEEP_PREFIXES = ("LC_", "NVIDIA_", "CUDA_")


def worker_env() -> dict[str, str]:
    """The environment of a worker: ours (in public mode only the ENV_KEEP allow-list of it),
    plus the package on the path and unbuffered output."""
    env = dict(os.environ)
    if env.get("LORA_STUDIO_MODE") == "public":
        env = {k: v for k, v in env.items() if k in ENV_KEEP or k.startswith(ENV_KEEP_PREFIXES)}
        # Nor the token a `huggingface-cli login` left in HF_HOME: not sent unless passed, not read.
        env.update(HF_HUB_DISABLE_IMPLICIT_TOKEN="1", HF_TOKEN_PATH=os.devnull, HF_STORED_TOKENS_PATH=os.devnull)
    paths = [str(_PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------- the supervisor process


def supervise(run_dir: Path, resume: bool, gpus: str, max_active: int) -> int:
    """Run the worker of `run_dir` to its end, record how it ended, then start what is queued."""
    cmd = [sys.executable, "-m", "lora_studio", "train", "--gpus", gpus]
    cmd += ["--resume", str(run_dir)] if resume else ["--config", str(run_dir / "config.json")]
    _say(f"{'resuming' if resume else 'starting'}: {' '.join(cmd)}")
    env = {**worker_env(), "LORA_STUDIO_SUPERVISED": "1"}
    # The worker's output reaches train.log (our stdout) through `redact`: a library's error
    # that quotes a token (a URL, a header) must not be written to disk or shown in the UI.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    copier = threading.Thread(target=_copy_redacted, args=(proc.stdout, sys.stdout.buffer), daemon=True)
    copier.start()
    # Under the runs-folder lock: the Runner that launched us writes supervisor.json under it
    # right after our start, and our update must come after its write, not be overwritten by it.
    # Our own pid goes in too, for a launcher killed before it could write the file.
    with Runner(run_dir.parent, max_active=max_active, gpus=gpus)._lock():
        sup = rf.read_json(run_dir / SUPERVISOR)
        sup.setdefault("pid", os.getpid())
        sup.setdefault("pid_started", _create_time(os.getpid()))
        sup.setdefault("host", rf.hostname())
        sup.update(worker_pid=proc.pid, worker_started=_create_time(proc.pid))
        rf.write_json_atomic(run_dir / SUPERVISOR, sup)

    terminating = []

    def forward(signum: int, frame: Any) -> None:  # a stop of the app's container: let the worker save
        terminating.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    max_wall_s = rf.read_json(run_dir / rf.OWNER).get("max_wall_s")
    began, capped = time.monotonic(), False
    while True:
        (run_dir / HEARTBEAT).touch()
        try:
            code = proc.wait(timeout=HEARTBEAT_S if not max_wall_s else min(HEARTBEAT_S, max(0.5, max_wall_s / 4)))
            break
        except subprocess.TimeoutExpired:
            if max_wall_s and not capped and time.monotonic() - began > max_wall_s:
                # The server's time cap: the same stop a visitor asks for (a checkpoint, the adapter).
                capped = True
                rf.write_status(run_dir, rf.read_status(run_dir).get("state") or rf.RUNNING, capped="wall_s")
                rf.request_stop(run_dir, save=True)
                _say(f"wall-time cap of {max_wall_s:g} s reached: stopping")
            continue
    copier.join(timeout=5)
    # A full disk must not stop the supervisor before it starts the next run: an app's poll
    # (and the reserve of each run) covers what cannot be written now.
    with contextlib.suppress(OSError):
        if capped and rf.read_status(run_dir).get("state") == rf.STOPPED:
            found = rf.checkpoint_folders(run_dir)
            saved = f"a checkpoint of step {found[-1][0]} was saved" if found else "no step had been trained yet"
            rf.write_status(run_dir, rf.STOPPED, message=f"stopped by this server's time limit of {max_wall_s:g} s per run "
                            f"(LORA_STUDIO_MAX_WALL_S); {saved}", capped="wall_s")
        if rf.read_status(run_dir).get("state") not in rf.FINAL_STATES:
            message = describe_exit(code) if code != 0 else "the training process ended without a final status; see train.log"
            write_interrupted(run_dir, f"{message}.", exit_code=code, log_tail=_log_tail(run_dir))
    _say(f"worker exited with code {code}")
    if not terminating:  # on SIGTERM the machine is going down: the queue waits for the next start
        Runner(run_dir.parent, max_active=max_active, gpus=gpus).poll()  # the next queued run, if any
    return 0


def _say(text: str) -> None:
    """One line of the supervisor's own in train.log (dropped when the disk is full)."""
    with contextlib.suppress(OSError, ValueError):
        print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}", flush=True)


def _copy_redacted(source: Any, sink: Any, chunk: int = 1 << 16) -> None:
    """Copy the worker's output line by line (a line cut at `chunk` bytes), tokens redacted."""
    for line in iter(lambda: source.readline(chunk), b""):
        text = line.decode("utf-8", errors="replace")
        with contextlib.suppress(OSError, ValueError):  # a full disk must not kill the supervisor
            sink.write(redact(text).encode("utf-8"))
            sink.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_studio.supervisor")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("supervise", help="(internal) run one run's worker; started by Runner")
    p.add_argument("run_dir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--gpus", default="auto")
    p.add_argument("--max-active", type=int, default=1, dest="max_active")
    args = parser.parse_args(argv)
    return supervise(Path(args.run_dir), args.resume, args.gpus, args.max_active)


if __name__ == "__main__":
    sys.exit(main())
