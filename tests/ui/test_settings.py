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


def test_one_size_limit_sets_both_upload_checks():
    """LORA_STUDIO_MAX_UPLOAD_MB alone (the data limit) also sets gradio's upload limit; an explicit
    LORA_STUDIO_MAX_UPLOAD wins; neither: 200 MB."""
    from gradio.utils import _parse_file_size

    assert AppSettings.from_env({}).max_upload == "200mb"
    limit = AppSettings.from_env({"LORA_STUDIO_MAX_UPLOAD_MB": "0.5"}).max_upload
    assert _parse_file_size(limit) == 512 * 1024
    assert _parse_file_size(AppSettings.from_env({"LORA_STUDIO_MAX_UPLOAD_MB": "50"}).max_upload) == 50 * 1024 * 1024
    both = {"LORA_STUDIO_MAX_UPLOAD_MB": "50", "LORA_STUDIO_MAX_UPLOAD": "10mb"}
    assert AppSettings.from_env(both).max_upload == "10mb"
    assert AppSettings.from_env({"LORA_STUDIO_MAX_UPLOAD_MB": "junk"}).max_upload == "200mb"
