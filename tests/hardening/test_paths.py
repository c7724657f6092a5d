"""Path traversal through the Runner API: ids with `..`, absolute paths, and a run folder that is
a symlink pointing outside the runs folder are refused by every entry point, and nothing outside
is read, changed or deleted."""

from __future__ import annotations

import pytest

from lora_studio import runfiles as rf
from lora_studio.runner import Runner

BAD_IDS = ["../x", "..", "../../etc", "/etc", "/tmp/x", "a/../../x", "x/..", "./x", "~root", "a\x00b", "a\nb", "é/x"]


def calls(runner: Runner, run_id: str):
    return {
        "status": lambda: runner.status(run_id),
        "metrics": lambda: runner.metrics(run_id),
        "stop": lambda: runner.stop(run_id),
        "resume": lambda: runner.resume(run_id),
        "delete": lambda: runner.delete(run_id),
        "log": lambda: runner.log(run_id),
        "start": lambda: runner.start({"data": "d.jsonl"}, run_id=run_id),
    }


@pytest.fixture
def outside(tmp_path):
    """A folder next to the runs folder that looks like a finished run (a target worth reaching)."""
    target = tmp_path / "outside"
    target.mkdir()
    rf.write_status(target, rf.STOPPED, step=3)
    (target / rf.METRICS).write_text('{"step": 1, "loss": 1.0}\n')
    (target / rf.LOG).write_text("secret log\n")
    return target


@pytest.mark.parametrize("bad", BAD_IDS)
def test_traversal_ids_are_refused_by_every_call(tmp_path, outside, bad):
    runner = Runner(tmp_path / "runs", max_active=0)
    for name, call in calls(runner, bad).items():
        with pytest.raises(ValueError, match="invalid run id"):
            call()
    assert sorted(p.name for p in outside.iterdir()) == sorted([rf.STATUS, rf.METRICS, rf.LOG])
    assert rf.read_status(outside)["state"] == rf.STOPPED
    assert not (tmp_path / "x").exists()


def test_a_symlinked_run_folder_pointing_outside_is_refused(tmp_path, outside):
    runs = tmp_path / "runs"
    runner = Runner(runs, max_active=0)
    (runs / "linked").symlink_to(outside, target_is_directory=True)
    for name, call in calls(runner, "linked").items():
        with pytest.raises(ValueError, match="link out of"):
            call()
    assert "linked" not in [r["run_id"] for r in runner.list_runs()]  # not listed either
    # Untouched: not deleted, not resumed (status still stopped), no control file written.
    assert rf.read_status(outside)["state"] == rf.STOPPED
    assert not (outside / rf.CONTROL).exists()
    assert (outside / rf.LOG).read_text() == "secret log\n"


def test_a_symlinked_file_inside_a_real_run_folder_is_not_followed_by_delete(tmp_path, outside):
    runs = tmp_path / "runs"
    runner = Runner(runs, max_active=0)
    run_id = runner.start({"data": "d.jsonl"}, run_id="real")
    runner.stop(run_id)  # queued -> aborted
    (runs / run_id / "escape").symlink_to(outside, target_is_directory=True)
    runner.delete(run_id)
    assert not (runs / run_id).exists()
    assert sorted(p.name for p in outside.iterdir()) == sorted([rf.STATUS, rf.METRICS, rf.LOG])


def test_a_legit_id_still_works(tmp_path):
    runner = Runner(tmp_path / "runs", max_active=0)
    run_id = runner.start({"data": "d.jsonl"}, run_id="ok-1.2_x")
    assert runner.status(run_id)["state"] == "queued"
