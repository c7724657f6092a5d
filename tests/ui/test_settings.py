"""Deployment settings read from the environment, as a Space passes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_studio.ui.settings import AppSettings


def test_defaults_serve_this_machine_only_in_local_mode():
    s = AppSettings.from_env({})
    assert (s.runs_dir, s.model, s.auth, s.host, s.port) == (Path("runs"), "bundled", None, "127.0.0.1", 7860)
    assert s.mode == "local" and not s.public and s.limits.steps == 0 and s.local_models


def test_a_space_is_public_on_every_interface_with_limits():
    s = AppSettings.from_env({"SPACE_ID": "someone/studio"})
    assert (s.mode, s.host, s.local_models, s.oauth) == ("public", "0.0.0.0", False, False)
    assert s.limits.runs_per_visitor == 1 and s.limits.steps > 0 and s.limits.new_tokens > 0
    # OAuth only on a real Space whose front matter asked for it (the Space sets these).
    space = {"SPACE_ID": "someone/studio", "SYSTEM": "spaces", "OAUTH_CLIENT_ID": "abc"}
    assert AppSettings.from_env(space).oauth is True
    assert AppSettings.from_env({**space, "LORA_STUDIO_MODE": "local"}).oauth is False


@pytest.mark.parametrize(
    "env,mode,expected",
    [
        ({}, None, "local"),
        ({"LORA_STUDIO_MODE": "public"}, None, "public"),
        ({"SPACE_ID": "a/b", "LORA_STUDIO_MODE": " Local "}, None, "local"),
        ({"SPACE_ID": "a/b"}, "local", "local"),  # the flag wins
        ({}, "public", "public"),
    ],
)
def test_mode_from_flag_environment_or_space(env, mode, expected):
    assert AppSettings.from_env(env, mode=mode).mode == expected


def test_explicit_host_wins_and_bad_values_are_refused_naming_the_variable():
    assert AppSettings.from_env({"GRADIO_SERVER_NAME": "0.0.0.0"}).host == "0.0.0.0"
    assert AppSettings.from_env({"LORA_STUDIO_MODE": "public", "GRADIO_SERVER_NAME": "127.0.0.1"}).host == "127.0.0.1"
    with pytest.raises(ValueError, match="LORA_STUDIO_MODE must be local or public"):
        AppSettings.from_env({"LORA_STUDIO_MODE": "open"})
    with pytest.raises(ValueError, match="LORA_STUDIO_MAX_STEPS must be a number"):
        AppSettings.from_env({"LORA_STUDIO_MODE": "public", "LORA_STUDIO_MAX_STEPS": "lots"})
    with pytest.raises(ValueError, match="LORA_STUDIO_ALLOW_REMOTE_CODE=1 is refused in public mode"):
        AppSettings.from_env({"LORA_STUDIO_MODE": "public", "LORA_STUDIO_ALLOW_REMOTE_CODE": "1"})


def test_limits_and_admins_from_the_environment():
    env = {"LORA_STUDIO_MODE": "public", "LORA_STUDIO_MAX_STEPS": "50", "LORA_STUDIO_MAX_WALL_S": "0",
           "LORA_STUDIO_ADMINS": "ana, bo ,"}
    s = AppSettings.from_env(env)
    assert (s.limits.steps, s.limits.wall_s, s.admins) == (50, 0, frozenset({"ana", "bo"}))
    assert AppSettings.from_env({**env, "LORA_STUDIO_MODE": "local"}).limits.steps == 0  # local: no caps
    assert "secret-key" not in repr(AppSettings.from_env({"LORA_STUDIO_SECRET": "secret-key"}))


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


def test_the_space_front_matter_asks_for_oauth_and_the_image_runs_public_mode():
    root = Path(__file__).resolve().parents[2]
    front = (root / "README.md").read_text().split("---")[1]
    assert "\nhf_oauth: true\n" in front and "- write-repos" in front  # "Sign in with Hugging Face", pushes
    docker = (root / "Dockerfile").read_text()
    assert "LORA_STUDIO_MODE=public" in docker and "GRADIO_SERVER_NAME=0.0.0.0" in docker
