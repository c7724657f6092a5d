"""Exports: the Hub push uploads the adapter with its card and never writes or echoes the token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_studio import export
from tests.conftest import format_rows, write_jsonl


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    from lora_studio.config import TrainConfig
    from lora_studio.train import train

    root = tmp_path_factory.mktemp("export")
    data = write_jsonl(root / "answers.jsonl", format_rows(8))
    status = train(TrainConfig(data=str(data), out=str(root / "run"), model=tiny_llama_dir, rank=4, batch_size=4, max_steps=3))
    assert status["state"] == "done"
    return root / "run"


class FakeHub:
    """Records what would be sent to the Hub; optionally fails like a real client, echoing the token."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if self.fail:
            raise RuntimeError(f"401 Unauthorized for token {kwargs['token']}")
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        self.uploaded = {p.name: p.read_bytes() for p in folder.iterdir()}


def test_push_uploads_the_adapter_and_its_card(run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub = FakeHub()
    url = export.push_to_hub(run_dir, "me/tiny-lora", "hf_typed", kind="adapter", private=True, api=hub)
    assert url == "https://huggingface.co/me/tiny-lora"
    (_, create), (_, upload) = hub.calls
    assert create == {"repo_id": "me/tiny-lora", "token": "hf_typed", "private": True, "exist_ok": True}
    assert upload["repo_id"] == "me/tiny-lora" and upload["token"] == "hf_typed"
    assert set(hub.uploaded) == {"adapter_config.json", "adapter_model.safetensors", "lora_studio.json", "README.md"}
    assert hub.uploaded["adapter_model.safetensors"] == (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    card = hub.uploaded["README.md"].decode()
    assert "# me/tiny-lora" in card and 'PeftModel.from_pretrained(base, "me/tiny-lora")' in card
    assert not any(b"hf_typed" in content for content in hub.uploaded.values())


def test_push_falls_back_to_hf_token_and_scrubs_it_from_errors(run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fromENV123")
    hub = FakeHub(fail=True)
    with pytest.raises(export.HubError) as info:
        export.push_to_hub(run_dir, "me/x", "", api=hub)
    assert hub.calls[0][1]["token"] == "hf_fromENV123"
    assert "hf_fromENV123" not in str(info.value) and "***" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("repo", ["", "noslash", "a/b/c", "me/has space"])
def test_push_refuses_bad_repo_names(run_dir, repo):
    with pytest.raises(ValueError, match="user/name"):
        export.push_to_hub(run_dir, repo, "hf_x", api=FakeHub())


def test_push_without_any_token_says_so(run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ValueError, match="no Hub token"):
        export.push_to_hub(run_dir, "me/x", "  ", api=FakeHub())


def test_card_reports_the_runs_own_figures(run_dir):
    card = export.model_card(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert f"| first / final train loss | {rows[0]['loss']:.4g} / {rows[-1]['loss']:.4g} |" in card
    assert f"| steps | {len(rows)} of {len(rows)} |" in card and "`answers.jsonl`" in card
    assert "base_model:" not in card  # a local folder is not a Hub id: no broken link in the front matter
    assert "| method | lora |" in card
