"""A planted Hub token never reaches a file a run writes or the process output: HF_TOKEN set in
the worker's environment (where real tokens come from), a token pasted into a settings field,
and an error message that quotes a token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_studio.config import TrainConfig
from lora_studio.redact import redact
from lora_studio.runner import Runner
from lora_studio.engine.run import train

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_PLANTEDsecretAbC123xyz789QQ"
SECRET = b"PLANTEDsecret"  # any piece of it, in any file, is a leak


def leaks(folder: Path) -> list[str]:
    """Every file under `folder` (hidden ones, logs, checkpoints, adapter) holding the secret."""
    found, scanned = [], 0
    for path in folder.rglob("*"):
        if path.is_file():
            scanned += 1
            if SECRET in path.read_bytes():
                found.append(str(path.relative_to(folder)))
    assert scanned >= 5, f"only {scanned} files scanned: the run wrote less than expected"
    return found


def test_redact_replaces_token_like_values_and_keeps_the_rest():
    assert redact(f"401 Client Error for {TOKEN} at url") == "401 Client Error for hf_*** at url"
    assert redact("Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345") == "Authorization: Bearer ***"
    assert redact("row 3, field 'instruction': expected text") == "row 3, field 'instruction': expected text"
    assert redact("hf_short") == "hf_short"  # not token-like: left alone
    assert redact(None) is None


def test_runner_run_with_hf_token_in_the_environment_writes_it_nowhere(tiny_llama_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", TOKEN)
    runs = tmp_path / "runs"
    runner = Runner(runs)
    run_id = runner.start(dict(data=str(train_file), model=tiny_llama_dir, rank=4, batch_size=4, max_steps=4,
                               checkpoint_every=2, eval_every=0, val_fraction=0.2))
    status = runner.wait(run_id, timeout=180)
    assert status["state"] == "done", status
    files = {p.name for p in (runs / run_id).rglob("*")}
    assert {"config.json", "status.json", "train.log", "metrics.jsonl", "adapter_model.safetensors"} <= files
    assert leaks(runs) == []


def test_cli_with_hf_token_keeps_it_out_of_output_and_run_folder(tiny_llama_dir, train_file, tmp_path):
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_studio", "train", "--data", str(train_file), "--out", str(out),
         "--model", tiny_llama_dir, "--rank", "4", "--max-steps", "3", "--checkpoint-every", "1", "--merge"],
        capture_output=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert SECRET not in proc.stdout + proc.stderr
    assert leaks(out) == []


def test_a_token_pasted_into_a_settings_field_is_refused_without_echoing_it(tmp_path, train_file):
    runner = Runner(tmp_path / "runs", max_active=0)
    with pytest.raises(ValueError, match="looks like an access token") as info:
        runner.start({"data": str(train_file), "model": TOKEN})
    assert TOKEN not in str(info.value)
    assert runner.list_runs() == []  # no folder, no config.json holding it

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_studio", "train", "--data", str(train_file), "--out", str(tmp_path / "cli"),
         "--model", TOKEN], capture_output=True, env=env, cwd=ROOT, timeout=120,
    )
    assert proc.returncode != 0 and b"looks like an access token" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert not (tmp_path / "cli").exists() or leaks_any(tmp_path / "cli") == []


def leaks_any(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and SECRET in p.read_bytes()]


def test_an_error_quoting_a_token_is_redacted_in_status_and_error_log(tiny_llama_dir, train_file, tmp_path):
    def fail(row):
        raise RuntimeError(f"401 Unauthorized: invalid token {TOKEN} for push")

    cfg = TrainConfig(data=str(train_file), out=str(tmp_path / "run"), model=tiny_llama_dir, rank=4, max_steps=3)
    status = train(cfg, on_step=fail)
    assert status["state"] == "failed" and "401 Unauthorized" in status["error"] and "hf_***" in status["error"]
    assert (tmp_path / "run" / "error.log").exists()
    assert leaks_any(tmp_path / "run") == []
