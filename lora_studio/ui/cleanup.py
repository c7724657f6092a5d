"""Public mode housekeeping: what anonymous visitors leave behind does not stay forever.

Every CLEAN_EVERY_S (and once at start), in a daemon thread of the app:
- a finished run of an anonymous visitor (owner `anon-...`) older than the keep time is deleted
  (their id lives in one browser: nobody may come back for it);
- a merged export (RUN/merged, a full model copy) older than a day is deleted, whoever's run;
- an uploaded data file older than the keep time that no remaining run uses is deleted;
- an anonymous visitor's bake-off (RUNS/.bakeoffs) older than the keep time, once its runs are gone.
Signed-in visitors' and the operator's runs are kept. Gradio's own cache is cleaned by gradio
(`delete_cache`, set in ui/app.py).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

from lora_studio import runfiles as rf

CLEAN_EVERY_S = 3600.0
MERGED_KEEP_S = 86400.0


def clean(studio: Any, keep_s: float, now: float | None = None) -> list[str]:
    """One pass; returns what was removed (paths relative to the runs folder)."""
    now = time.time() if now is None else now
    removed: list[str] = []
    runs_dir: Path = studio.runs_dir
    used: set[str] = set()
    for status in studio.runner.list_runs():
        run_id = status["run_id"]
        folder = runs_dir / run_id
        owner = rf.read_owner(folder) or ""
        ended = status.get("finished_at") or status.get("updated_at") or 0
        if owner.startswith("anon-") and status.get("state") in rf.FINAL_STATES and now - ended > keep_s:
            try:
                studio.runner.delete(run_id)
                removed.append(run_id)
                continue
            except (ValueError, OSError):
                pass  # still finishing, or already gone: next time
        merged = folder / "merged"
        if merged.is_dir() and not merged.is_symlink() and now - merged.stat().st_mtime > MERGED_KEEP_S:
            shutil.rmtree(merged, ignore_errors=True)
            removed.append(f"{run_id}/merged")
        data = rf.read_json(folder / "config.json").get("data")
        if isinstance(data, str):
            used.add(Path(data).name)
    removed += _clean_bakeoffs(runs_dir, keep_s, now)
    uploads = runs_dir / ".uploads"
    if uploads.is_dir() and not uploads.is_symlink():
        for path in uploads.iterdir():
            if path.is_file() and path.name not in used and now - path.stat().st_mtime > keep_s:
                path.unlink(missing_ok=True)
                removed.append(f".uploads/{path.name}")
    return removed


def _clean_bakeoffs(runs_dir: Path, keep_s: float, now: float) -> list[str]:
    """An anonymous visitor's bake-off older than the keep time goes once none of its runs is left."""
    removed = []
    root = runs_dir / ".bakeoffs"
    for folder in sorted(root.iterdir()) if root.is_dir() and not root.is_symlink() else []:
        spec = rf.read_json(folder / "bakeoff.json") if folder.is_dir() and not folder.is_symlink() else {}
        owner, runs = str(spec.get("owner") or ""), (spec.get("runs") or {}).values()
        if owner.startswith("anon-") and now - (spec.get("created_at") or now) > keep_s and not any((runs_dir / r).exists() for r in runs):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f".bakeoffs/{folder.name}")
    return removed


def start_cleanup(studio: Any, keep_s: float) -> threading.Thread:
    def loop() -> None:
        while True:
            try:
                clean(studio, keep_s)
            except Exception as e:  # noqa: BLE001 - housekeeping must never take the app down
                print(f"cleanup: {e.__class__.__name__}: {e}", flush=True)
            time.sleep(CLEAN_EVERY_S)

    thread = threading.Thread(target=loop, name="lora-studio-cleanup", daemon=True)
    thread.start()
    return thread
