"""Bake-off: train several methods on the same data, seed and budget, one after another through
the background runner, score each by generation, and rank them.

A bake-off is a folder:

  bakeoff.json      what was asked (methods, shared settings, test file, owner) and the run of each method
  scores/METHOD.json, scores/METHOD.jsonl   each method's scores and replies (lora_studio.evaluate)
  leaderboard.csv, leaderboard.md, loss.png  the ranking and the overlaid train-loss curves

`advance()` moves the series on by one notch (start the next method when none is active,
score a finished one, rewrite the leaderboard) and is safe to call from anywhere at any time:
the CLI calls it in a loop, the app on each tick of the Runs tab's timer. Only one method's run
is queued or running at a time, so a visitor's fair-share cap of one active run holds.
No gradio here.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import math
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from lora_studio import runfiles as rf
from lora_studio.config import TrainConfig
from lora_studio.methods import REGISTRY

BAKEOFF_FILE = "bakeoff.json"
COLUMNS = ["method", "run", "eval_loss", "exact_match", "f1", "rougeL", "train_s", "tokens_per_s", "peak_mb", "trainable_params"]
DEFAULT_VAL_FRACTION = 0.2
"""Rows held out for scoring when neither a test file nor validation data is given."""
_PER_METHOD = ("rank", "alpha", "dropout", "lr", "lr_ratio")


def new_id() -> str:
    """bkYYYYMMDD-HHMMSS-xxxx: sorts by time, and names its runs <id>-<method>."""
    return f"bk{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def parse_methods(methods: str | list[str]) -> list[str]:
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m and m.strip()]
    unknown = [m for m in names if m not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(REGISTRY)}")
    if len(names) < 1 or len(set(names)) != len(names):
        raise ValueError("a bake-off needs one or more different methods")
    return names


def method_config(shared: dict[str, Any], method: str) -> TrainConfig:
    """The shared settings with `method`; rank, alpha, dropout, lr and lr_ratio left unset fall
    to that method's own defaults (VeRA trains at a higher rank and learning rate than LoRA)."""
    return TrainConfig.from_dict({**shared, "method": method, "method_options": dict(shared.get("method_options") or {})})


def create(
    out_dir: str | Path, cfg: TrainConfig, methods: str | list[str], test: str | None = None, owner: str | None = None,
    max_new_tokens: int = 64, max_wall_s: float | None = None, bk_id: str | None = None,
) -> dict[str, Any]:
    """Write a new bake-off's plan into `out_dir` (nothing is started: `advance` does that).
    Every method's settings are checked first, so a bad one is refused before any run."""
    from lora_studio.evaluate import reference_rows

    names = parse_methods(methods)
    shared = cfg.to_dict()
    if not test and not cfg.val_data and not cfg.val_fraction:
        shared["val_fraction"] = DEFAULT_VAL_FRACTION  # something held out to score on
    if test:
        test = str(Path(test).resolve()) if Path(test).exists() else test
        if cfg.early_stop and not cfg.test_data:
            shared["test_data"] = test  # early stopping on the score the leaderboard ranks by
    for name in names:
        method_config(shared, name).resolved()  # raises naming the field
    if test:
        reference_rows(test, cfg.format, cfg.columns)  # a bad test file fails now, not after training
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / BAKEOFF_FILE).exists():
        raise ValueError(f"{out} already holds a bake-off; choose another folder")
    spec = {
        "id": bk_id or new_id(), "methods": names, "config": shared,
        "test": test, "owner": owner, "max_new_tokens": max_new_tokens, "max_wall_s": max_wall_s,
        "runs": {}, "created_at": time.time(),
    }  # fmt: skip
    rf.write_json_atomic(out / BAKEOFF_FILE, spec)
    return spec


def load(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / BAKEOFF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{out_dir}: not a bake-off folder (no {BAKEOFF_FILE})")
    return rf.read_json(path)


@contextlib.contextmanager
def _lock(out_dir: Path, wait: bool = False) -> Iterator[bool]:
    """True when this caller holds the bake-off (two app tabs ticking at once: one advances);
    `wait`: block until it is free instead of answering False."""
    with open(out_dir / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def advance(out_dir: str | Path, runner: Any, can_start: Any = None) -> dict[str, Any]:
    """One notch of the series; returns `progress()`. `can_start()` (optional) may refuse to
    start the next run for now (a full queue): it is tried again on the next call."""
    out = Path(out_dir)
    with _lock(out) as mine:
        if mine:
            spec = load(out)
            for method in spec["methods"]:
                run_id = spec["runs"].get(method)
                if run_id is None:
                    if not spec.get("cancelled") and (can_start is None or can_start()):
                        cfg = method_config(spec["config"], method)
                        spec["runs"][method] = runner.start(
                            cfg, run_id=f"{spec['id']}-{method}", owner=spec.get("owner"), max_wall_s=spec.get("max_wall_s")
                        )
                        rf.write_json_atomic(out / BAKEOFF_FILE, spec)
                    break
                state = _status(runner, run_id).get("state")
                if state not in rf.FINAL_STATES:
                    break
                if state in (rf.DONE, rf.STOPPED) and not (out / "scores" / f"{method}.json").exists():
                    _score(out, spec, method, runner.run_dir(run_id))
            write_leaderboard(out, runner)
            state = progress(out, runner)
            if state["finished"] and not spec.get("finished_at"):  # advance_all skips it from now on
                spec["finished_at"] = time.time()
                rf.write_json_atomic(out / BAKEOFF_FILE, spec)
            return state
    return progress(out, runner)


def advance_all(root: str | Path, runner: Any, can_start: Any = None) -> list[str]:
    """`advance` every unfinished bake-off under `root` (the app's background thread: a series goes
    on with no page open). `can_start(owner)` as in `advance`. Returns the ids advanced."""
    done = []
    root = Path(root)
    for out in sorted(root.iterdir()) if root.is_dir() else []:
        if out.is_symlink() or not (out / BAKEOFF_FILE).exists():
            continue
        spec = load(out)
        if spec.get("finished_at"):
            continue
        owner = spec.get("owner")
        advance(out, runner, None if can_start is None else (lambda owner=owner: can_start(owner)))
        done.append(out.name)
    return done


def _status(runner: Any, run_id: str) -> dict[str, Any]:
    try:
        return runner.status(run_id)
    except FileNotFoundError:  # deleted by its owner: counts as over
        return {"state": rf.ABORTED, "error": "the run was deleted"}


def _score(out: Path, spec: dict[str, Any], method: str, run_dir: Path) -> None:
    from lora_studio.chat import heldout_prompts
    from lora_studio.compare import TunedModel
    from lora_studio.evaluate import evaluate_run, reference_rows

    target = out / "scores" / f"{method}.json"
    try:
        if not (run_dir / "adapter").exists():
            raise ValueError("the run saved no adapter")
        tm = TunedModel(run_dir)
        cfg = spec["config"]
        rows = reference_rows(spec["test"], cfg.get("format"), cfg.get("columns")) if spec.get("test") else heldout_prompts(run_dir, tm.tokenizer)
        evaluate_run(run_dir, rows, target, spec.get("max_new_tokens"), with_base=False, model=tm)
    except Exception as e:  # noqa: BLE001 - one method's scoring failure must not stop the series
        target.parent.mkdir(parents=True, exist_ok=True)
        rf.write_json_atomic(target, {"error": f"scoring failed: {e}"})


def progress(out_dir: str | Path, runner: Any) -> dict[str, Any]:
    """The queue (method, run, state) and the leaderboard rows; `finished` once every method ran and was scored."""
    out = Path(out_dir)
    spec = load(out)
    queue, finished = [], True
    for method in spec["methods"]:
        run_id = spec["runs"].get(method)
        state = _status(runner, run_id).get("state") if run_id else "waiting"
        scored = (out / "scores" / f"{method}.json").exists()
        if (state not in rf.FINAL_STATES and not (state == "waiting" and spec.get("cancelled"))) or (
            state in (rf.DONE, rf.STOPPED) and not scored
        ):
            finished = False
        queue.append({"method": method, "run": run_id or "", "state": state if state not in (rf.DONE, rf.STOPPED) or scored else "scoring"})
    return {"id": spec["id"], "owner": spec.get("owner"), "queue": queue, "rows": leaderboard(out, runner),
            "finished": finished, "cancelled": bool(spec.get("cancelled"))}  # fmt: skip


def cancel(out_dir: str | Path, runner: Any) -> None:
    """Start no further method and stop the active run (it keeps its adapter and is scored)."""
    out = Path(out_dir)
    with _lock(out, wait=True):  # not while advance() is starting the next run
        spec = load(out)
        spec["cancelled"] = True
        rf.write_json_atomic(out / BAKEOFF_FILE, spec)
    for run_id in spec["runs"].values():
        if _status(runner, run_id).get("state") in rf.WAITING_STATES:
            runner.stop(run_id, save=True)


def leaderboard(out_dir: str | Path, runner: Any) -> list[dict[str, Any]]:
    """One row per method (COLUMNS, plus `state` and `note`), best ROUGE-L first, then lowest eval loss."""
    out = Path(out_dir)
    spec = load(out)
    rows = []
    for method in spec["methods"]:
        run_id = spec["runs"].get(method)
        row: dict[str, Any] = {c: None for c in COLUMNS} | {"method": method, "run": run_id or "", "state": "waiting", "note": ""}
        if run_id:
            st = _status(runner, run_id)
            metrics = rf.read_metrics(runner.run_dir(run_id)) if runner.run_dir(run_id).exists() else []
            # the eval loss of the adapter kept: the best evaluation's when early stopping kept one
            evals = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
            kept = st.get("best_step") if st.get("best_step") in evals else max(evals, default=None)
            train_s = metrics[-1]["elapsed_s"] if metrics else None
            tokens = sum(m.get("tokens", 0) for m in metrics)
            peaks = [m.get("cuda_peak_mb") or m.get("peak_rss_mb") for m in metrics]
            row.update(
                state=st.get("state"), note=st.get("error") or st.get("stop_reason") or "",
                eval_loss=evals.get(kept), train_s=train_s,
                tokens_per_s=tokens / train_s if train_s else None, peak_mb=max((p for p in peaks if p), default=None),
                trainable_params=st.get("trainable_params"),
            )  # fmt: skip
        scores = rf.read_json(out / "scores" / f"{method}.json") if (out / "scores" / f"{method}.json").exists() else {}
        if scores.get("error"):
            row["note"] = scores["error"]
        row.update({k: v for k, v in (scores.get("tuned") or {}).items() if k in COLUMNS})
        rows.append(row)

    def key(r: dict[str, Any]) -> tuple:
        return (-(r["rougeL"] if r["rougeL"] is not None else -1), r["eval_loss"] if r["eval_loss"] is not None else math.inf)

    return sorted(rows, key=key)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_leaderboard(out_dir: str | Path, runner: Any) -> list[dict[str, Any]]:
    """leaderboard.csv, leaderboard.md and loss.png (train loss by step, one line per method)."""
    from lora_studio.plot import loss_png

    out = Path(out_dir)
    rows = leaderboard(out, runner)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: _cell(r[c]) for c in COLUMNS} for r in rows)
    md = ["| " + " | ".join(COLUMNS + ["state"]) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    md += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS + ["state"]) + " |" for r in rows]
    md_text = "\n".join(md) + "\n"
    with contextlib.suppress(FileNotFoundError):
        if (out / "leaderboard.md").read_text() == md_text and (out / "leaderboard.csv").exists():
            return rows  # nothing new: advance() runs every few seconds, the files stay as they are
    rf.write_bytes_atomic(out / "leaderboard.csv", buf.getvalue().encode())
    rf.write_bytes_atomic(out / "leaderboard.md", md_text.encode())
    curves = {}
    for r in rows:
        if r["run"] and runner.run_dir(r["run"]).exists():
            curves[r["method"]] = {"curve": [(m["step"], m["loss"]) for m in rf.read_metrics(runner.run_dir(r["run"]))]}
    if any(c["curve"] for c in curves.values()):
        loss_png(curves, "Bake-off: train loss", out / "loss.png", x_label="optimizer step")
    return rows
