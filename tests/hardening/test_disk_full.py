"""A real full disk under the runs folder: a small tmpfs mounted by the test (it runs as root
here and in CI; elsewhere it skips, and test_faults.py's simulated full disks still run).

Intended behaviour: the run that meets the full disk ends `failed` with "disk full" (its last
words fit in the small reserve every run keeps); its last good checkpoint stays; listing runs
and polling keep working; a queued run waits while the disk is full and starts, and
finishes, once space returns.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from lora_studio import runfiles as rf
from lora_studio.engine.checkpoint import latest_checkpoint, load_checkpoint
from lora_studio.config import TrainConfig
from lora_studio.runner import Runner
from tests.helpers import kill_run_processes, wait_for


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB filesystem, or None where this process may not mount one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True
    ).returncode == 0
    yield mnt if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write until the filesystem refuses: the disk is then full to the last block."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        block = b"\0" * 65536
        while True:
            try:
                fh.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
        while True:  # the last partial block
            try:
                fh.write(b"\0" * 512)
            except OSError:
                break
    return filler


def test_a_full_disk_fails_the_run_keeps_serving_and_the_queue_resumes_with_space(
    small_disk, tiny_llama_dir, train_file
):
    if small_disk is None:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated full disks of test_faults.py still run")
    root = small_disk / "runs"
    runner = Runner(root)
    common = dict(data=str(train_file), out="unused", model=tiny_llama_dir, batch_size=2, max_seq_len=64, precision="fp32")
    try:
        first = runner.start(TrainConfig(**common, max_steps=100_000, checkpoint_every=1))
        queued = runner.start(TrainConfig(**common, max_steps=2))
        wait_for(lambda: (runner.status(first).get("checkpoint_step") or 0) >= 2, 120, "two checkpoints")

        filler = fill(small_disk)
        status = runner.wait(first, timeout=120)
        assert status["state"] == rf.FAILED, status
        assert "disk full" in status["error"], status["error"]
        # the listing and the queue keep working on the full disk
        listed = {r["run_id"]: r for r in runner.list_runs()}
        assert listed[first]["state"] == rf.FAILED and listed[queued]["state"] == rf.QUEUED
        runner.poll()
        time.sleep(1)
        assert runner.status(queued)["state"] == rf.QUEUED, "a queued run started on a full disk"
        # the last good checkpoint loads
        folder = latest_checkpoint(root / first)
        assert folder is not None
        saved = load_checkpoint(folder, rank=0, device="cpu")
        assert saved["state"]["step"] >= 2

        filler.unlink()  # space returns
        runner.poll()
        done = runner.wait(queued, timeout=120)
        assert done["state"] == rf.DONE, done
    finally:
        kill_run_processes(root)
