"""The CLI's engine commands: `train --checkpoint-every`, `train --resume RUN_DIR`, `runs`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lora_studio import runfiles as rf
from lora_studio.engine.checkpoint import list_checkpoints
from lora_studio.cli import main
from lora_studio.config import TrainConfig
from lora_studio.engine.run import train


def train_args(model_dir, data, out, *extra) -> list[str]:
    return ["train", "--model", model_dir, "--data", str(data), "--out", str(out), "--rank", "4", "--batch-size", "4", *extra]


def test_train_prints_progress_and_checkpoints_every_n(tiny_llama_dir, train_file, tmp_path, capsys):
    assert main(train_args(tiny_llama_dir, train_file, tmp_path, "--max-steps", "5", "--checkpoint-every", "2")) == 0
    out = capsys.readouterr().out
    assert "] " in out and "    5/5  loss" in out and "done: 5 steps" in out
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000004"]  # every 2; the two latest kept
    assert TrainConfig.load(tmp_path / "config.json").checkpoint_every == 2


def test_resume_continues_a_stopped_run(tiny_llama_dir, train_file, tmp_path, capsys):
    cfg = TrainConfig(data=str(train_file), out=str(tmp_path), model=tiny_llama_dir, rank=4, batch_size=4, max_steps=6)
    train(cfg, should_stop=lambda: len(rf.read_metrics(tmp_path)) >= 2)
    rf.request_stop(tmp_path)  # the request that stopped it must not stop the resume
    assert rf.read_status(tmp_path)["state"] == "stopped"
    assert main(["train", "--resume", str(tmp_path)]) == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert [r["step"] for r in rf.read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert rf.read_status(tmp_path)["resumed_from"] == 2


def test_resume_refuses_changed_settings(tiny_llama_dir, train_file, tmp_path):
    TrainConfig(data=str(train_file), out=str(tmp_path)).save(tmp_path / "config.json")
    with pytest.raises(SystemExit, match="drop the other training flags"):
        main(["train", "--resume", str(tmp_path), "--lr", "0.1"])
    with pytest.raises(SystemExit, match="not a run folder"):
        main(["train", "--resume", str(tmp_path / "nowhere")])


def test_runs_lists_state_method_step_and_loss(tmp_path, capsys):
    runs = tmp_path / "runs"
    for run_id, status in {
        "r-done": dict(state="done", method="lora", step=30, total_steps=30, loss=0.4321),
        "r-dead": dict(state="running", method="dora", step=7, total_steps=30, loss=1.5, pid=dead_pid(), host=rf.hostname()),
        "r-wait": dict(state="queued", method="vera", queued_at=1.0),
    }.items():
        (runs / run_id).mkdir(parents=True)
        rf.write_status(runs / run_id, status.pop("state"), **status)
    assert main(["runs", "--runs-dir", str(runs)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["r-done"].split()[1:5] == ["done", "lora", "30/30", "0.4321"]
    assert lines["r-dead"].split()[1:5] == ["failed", "dora", "7/30", "1.5000"]  # its process is gone
    assert "ended without a final status" in lines["r-dead"]
    assert lines["r-wait"].split()[1:3] == ["queued", "vera"] and "queue position 1" in lines["r-wait"]


def test_runs_on_an_empty_folder(tmp_path, capsys):
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    assert "no runs" in capsys.readouterr().out


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("extra,words", [
    (["--batch-size", "25"], "batch_size (25) is larger than the data (24 training examples); use a batch size of 24 or less"),
    (["--batch-size", "23", "--val-fraction", "0.1"], "batch_size (23) is larger than the data (22 training examples)"),
    (["--rank", "1000000000"], "is more than this machine has"),
    (["--method", "lora-pro", "--strategy", "fsdp", "--gpus", "2"], "LoRA-Pro cannot train with --strategy fsdp"),
], ids=["batch over the rows", "batch over the rows after the held-out split", "memory beyond the machine",
        "a method fsdp cannot shard, before torchrun starts"])
def test_train_refuses_what_the_train_tab_refuses_before_a_run_folder_exists(
    tiny_llama_dir, train_file, tmp_path, capsys, extra, words
):
    out = tmp_path / "run"
    args = ["train", "--model", tiny_llama_dir, "--data", str(train_file), "--out", str(out), "--rank", "4", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err
    assert not out.exists()  # refused before anything was written (the run itself would have made it)


def test_the_cli_and_the_train_tab_share_one_preflight():
    from lora_studio import preflight
    from lora_studio.ui import train_tab

    assert train_tab.preflight is preflight.preflight
