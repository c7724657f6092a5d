"""Deployment settings read from the environment, as a Space passes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_studio.ui.settings import AppSettings


def test_defaults_serve_a_space():
    s = AppSettings.from_env({})
    assert (s.runs_dir, s.model, s.auth, s.host, s.port) == (Path("runs"), "bundled", None, "0.0.0.0", 7860)


def test_environment_sets_runs_dir_model_login_and_port():
    s = AppSettings.from_env(
        {
            "LORA_STUDIO_RUNS_DIR": "/data/runs",
            "LORA_STUDIO_MODEL": "Qwen/Qwen3-0.6B",
            "LORA_STUDIO_USER": "ana",
            "LORA_STUDIO_PASSWORD": "pw",
            "GRADIO_SERVER_PORT": "9000",
        }
    )
    assert (s.runs_dir, s.model, s.auth, s.port) == (Path("/data/runs"), "Qwen/Qwen3-0.6B", ("ana", "pw"), 9000)


def test_half_a_login_is_refused():
    with pytest.raises(ValueError, match="LORA_STUDIO_PASSWORD"):
        AppSettings.from_env({"LORA_STUDIO_USER": "ana"})


def test_without_the_bundle_the_same_model_comes_from_the_hub(monkeypatch):
    from lora_studio import models

    def missing():
        raise FileNotFoundError("the bundled model is not installed")

    monkeypatch.setattr(models, "bundled_gguf_dir", missing)
    assert AppSettings.from_env({}).model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert AppSettings.from_env({"LORA_STUDIO_MODEL": "bundled"}).model == "bundled"
