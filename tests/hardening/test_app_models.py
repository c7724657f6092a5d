"""The Base model box on a public deployment, and the preview tokenizers kept in memory.

With local models off (`LORA_STUDIO_LOCAL_MODELS=0`, the default on a Space), the box takes the
bundled model, Hub ids and the operator's own `--model` only: any other folder on the server is
refused, by Start, the Data tab's preview and the preflight, with one message naming the box,
before a file of it is read. The cache of preview tokenizers keeps at most TOKENIZERS_KEPT models,
however many names visitors type. Unit tests of the setting and the check, then one launched app
configured like a Space."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.hardening.webapp import EXAMPLE, inspect, run_folders, settings
from tests.ui.conftest import ROOT, launch_app, stop_app
from tests.ui.test_api_train import run_id_of, wait_status

REFUSAL = "this server takes the bundled model or a Hub id (owner/name), not a folder on the server"


# ----------------------------------------------------------------- the setting


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, True),  # a laptop: the operator's own folders
        ({"SPACE_ID": "someone/studio"}, False),  # a Space: off unless asked for
        ({"SPACE_ID": "someone/studio", "LORA_STUDIO_LOCAL_MODELS": ""}, False),
        ({"SPACE_ID": "someone/studio", "LORA_STUDIO_LOCAL_MODELS": "1"}, True),
        ({"SPACE_ID": "someone/studio", "LORA_STUDIO_LOCAL_MODELS": " Yes "}, True),
        ({"LORA_STUDIO_LOCAL_MODELS": "off"}, False),  # a private server that wants the Space's rule
        ({"LORA_STUDIO_LOCAL_MODELS": "false"}, False),
    ],
)
def test_local_models_setting_from_the_environment(env, expected):
    from lora_studio.ui.settings import AppSettings

    assert AppSettings.from_env({"LORA_STUDIO_MODEL": "bundled", **env}).local_models is expected


def test_a_nonsense_local_models_value_is_refused_naming_the_variable():
    from lora_studio.ui.settings import AppSettings

    with pytest.raises(ValueError, match="LORA_STUDIO_LOCAL_MODELS must be 1/true/yes/on or 0/false/no/off"):
        AppSettings.from_env({"LORA_STUDIO_MODEL": "bundled", "LORA_STUDIO_LOCAL_MODELS": "maybe"})


# ----------------------------------------------------------------- the check


def _studio(tmp_path: Path, model: str, local_models: bool):
    from lora_studio.ui.common import Studio
    from lora_studio.ui.settings import AppSettings

    return Studio(AppSettings(runs_dir=tmp_path / "runs", model=model, local_models=local_models))


@pytest.fixture
def server(tmp_path, tiny_llama_dir, monkeypatch) -> Path:
    """A working folder holding other model folders: a copy of the tiny model, one laid out like a
    Hub id (owner/name), a link to the tiny model and a dangling link."""
    shutil.copytree(tiny_llama_dir, tmp_path / "other-model")
    shutil.copytree(tiny_llama_dir, tmp_path / "owner" / "name")
    (tmp_path / "link").symlink_to(tiny_llama_dir)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)
    return tmp_path


REFUSED = [
    "@other-model",  # absolute path of a real model folder
    "other-model",  # relative, Hub-id shaped, exists here
    "owner/name",  # relative, owner/name shaped, exists here: transformers would load the folder
    "./other-model",
    "../other-model",
    "link",
    "dangling",
    "/nonexistent/model",
    "~/models/x",
    "a/b/c",
    "C:\\models\\x",
    "../../..",
    "",
]


@pytest.mark.parametrize("spec", REFUSED)
def test_local_folders_are_refused_when_local_models_are_off(server, tiny_llama_dir, spec):
    spec = str(server / spec[1:]) if spec.startswith("@") else spec
    studio = _studio(server, tiny_llama_dir, local_models=False)
    with pytest.raises(ValueError) as refused:
        studio.check_model(spec)
    message = str(refused.value)
    assert message.startswith(f"Base model {spec!r}: {REFUSAL}") and "LORA_STUDIO_LOCAL_MODELS is off" in message


ALLOWED = ["bundled", "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "owner/elsewhere", "@operator"]


@pytest.mark.parametrize("spec", ALLOWED)
def test_the_bundled_model_hub_ids_and_the_operators_model_pass(server, tiny_llama_dir, spec):
    """The operator's --model is a local folder and stays allowed, spaces around it too."""
    spec = f"  {tiny_llama_dir} " if spec == "@operator" else spec
    assert Path(tiny_llama_dir).is_dir()
    _studio(server, tiny_llama_dir, local_models=False).check_model(spec)  # raises if refused


@pytest.mark.parametrize("spec", ["@other-model", "owner/name", "link"])
def test_local_folders_pass_when_local_models_are_on(server, tiny_llama_dir, spec):
    spec = str(server / spec[1:]) if spec.startswith("@") else spec
    _studio(server, "bundled", local_models=True).check_model(spec)  # raises if refused


# ----------------------------------------------------------------- the tokenizer cache


def test_the_preview_tokenizer_cache_stays_bounded(tmp_path, monkeypatch):
    """Fifty distinct model names keep TOKENIZERS_KEPT tokenizers, the ones used last; a name
    used again is not loaded again while it is kept, and is loaded again once dropped."""
    from lora_studio import models
    from lora_studio.ui.common import TOKENIZERS_KEPT

    loads: list[str] = []

    def fake_load(spec: str):
        loads.append(spec)
        return object()

    monkeypatch.setattr(models, "load_tokenizer", fake_load)
    studio = _studio(tmp_path, "bundled", local_models=True)
    names = [f"owner/model-{i}" for i in range(50)]
    first = studio.tokenizer(names[0])
    for name in names[1:]:
        studio.tokenizer(name)
        assert len(studio._tokenizers) <= TOKENIZERS_KEPT
    assert len(studio._tokenizers) == TOKENIZERS_KEPT == 8
    assert list(studio._tokenizers) == names[-TOKENIZERS_KEPT:]
    assert loads == names
    kept = [studio.tokenizer(name) for name in names[-TOKENIZERS_KEPT:]]  # all still there: no load
    assert len(loads) == 50 and len({id(t) for t in kept}) == TOKENIZERS_KEPT
    assert studio.tokenizer(names[0]) is not first and loads[-1] == names[0]  # dropped, loaded again
    # Least recently used goes first: the oldest kept name, used again, survives a newcomer; the next goes.
    oldest, next_oldest = list(studio._tokenizers)[:2]
    studio.tokenizer(oldest)
    studio.tokenizer("owner/newcomer")
    assert oldest in studio._tokenizers and next_oldest not in studio._tokenizers


def test_a_real_tokenizer_is_loaded_once_while_kept(tmp_path, tiny_llama_dir, monkeypatch):
    from lora_studio import models

    calls = []
    real = models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", lambda spec: calls.append(spec) or real(spec))
    studio = _studio(tmp_path, "bundled", local_models=True)
    tok = studio.tokenizer(tiny_llama_dir)
    assert studio.tokenizer(tiny_llama_dir) is tok and calls == [tiny_llama_dir]
    assert tok.eos_token is not None


# ----------------------------------------------------------------- through the app, set up like a Space


@pytest.fixture(scope="module")
def space(tmp_path_factory, tiny_llama_dir):
    """`python app.py` as on a Space (SPACE_ID set, LORA_STUDIO_LOCAL_MODELS unset), the operator
    having preselected a local folder; another model folder sits on the same server."""
    root = tmp_path_factory.mktemp("space")
    shutil.copytree(tiny_llama_dir, root / "other-model")
    # Empty: the default. A Space is in public mode: the settings of these tests fit its caps.
    env = {"SPACE_ID": "someone/lora-studio", "LORA_STUDIO_LOCAL_MODELS": "", "LORA_STUDIO_MAX_EPOCHS": "100"}
    launched = launch_app(root / "runs", tiny_llama_dir, root / "app.log", env)
    client = Client(launched.url, verbose=False)
    yield launched, client, str(root / "other-model")
    stop_app(launched)


@pytest.mark.parametrize("which", ["server folder", "relative folder of the app", "path out of the app folder"])
def test_a_space_refuses_server_folders_in_start_preview_and_preflight(space, tiny_llama_dir, which):
    app, client, other = space
    paths = {
        "server folder": other,
        "relative folder of the app": "lora_studio/ui",
        "path out of the app folder": "../..",
    }
    model = paths[which]
    assert (ROOT / model).exists() or Path(model).exists()  # each would otherwise name something real
    summary, *_ = inspect(client, EXAMPLE, tiny_llama_dir)  # the data itself is fine
    assert "ready to train" in summary
    before = run_folders(app.runs_dir)
    with pytest.raises(AppError) as started:
        client.predict(*settings(model), api_name="/start")
    assert f"Base model {model!r}: {REFUSAL}" in str(started.value)
    assert run_folders(app.runs_dir) == before
    with pytest.raises(AppError) as previewed:
        inspect(client, EXAMPLE, model)
    assert f"Base model {model!r}: {REFUSAL}" in str(previewed.value)
    preflight = client.predict(*settings(model), api_name="/preflight")
    assert "Settings to fix" in preflight and REFUSAL in preflight and "trainable parameters" not in preflight
    assert app.process.poll() is None


def test_a_space_still_takes_hub_ids_and_the_operators_folder(space, tiny_llama_dir):
    app, client, _ = space
    summary, *_ = inspect(client, EXAMPLE, tiny_llama_dir)  # the operator's folder previews
    assert "ready to train" in summary
    # A Hub id passes the check and fails only for being absent offline.
    with pytest.raises(AppError) as hub:
        client.predict(*settings("nobody-here/no-such-model-123"), api_name="/start")
    assert "HF_HUB_OFFLINE" in str(hub.value) and REFUSAL not in str(hub.value)
    # The operator's folder: preflight and a real (two-step) run.
    assert "trainable parameters" in client.predict(*settings(tiny_llama_dir), api_name="/preflight")
    before = run_folders(app.runs_dir)
    shown = client.predict(*settings(tiny_llama_dir, max_steps=2), api_name="/start")
    assert run_folders(app.runs_dir) - before == {run_id_of(shown[0])}
    wait_status(client, rf"{run_id_of(shown[0])}: finished\*\* after 2 steps")


def test_a_space_labels_the_box_without_local_folders(space):
    import httpx

    app, _, _ = space
    config = httpx.get(app.url + "config", timeout=10).json()
    box = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "model")
    assert box["props"]["label"] == "Base model: bundled, a Hub id"
