"""Model loading: local folders, clear errors, and (slow) the bundled SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from lora_studio.models import BUNDLED_HUB_ID, base_model_id, check_model_spec, load_model, load_tokenizer


def test_local_folder_loads_frozen_copy(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    assert model.config.num_hidden_layers == 2 and not model.training
    tok = load_tokenizer(tiny_llama_dir)
    assert tok.pad_token is not None and tok.chat_template


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weights"):
        check_model_spec(str(tmp_path))
    with pytest.raises(ValueError, match="no config.json"):
        check_model_spec(str(tmp_path.parent))


def test_tokenizer_without_template_gets_default(tiny_llama_dir, tmp_path):
    from lora_studio.models import prepare_tokenizer
    from tests.conftest import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = None
    prepare_tokenizer(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in text and text.endswith("<|assistant|>\n")


@pytest.mark.slow
def test_bundled_model_trains_a_few_steps(tmp_path):
    from lora_studio.config import TrainConfig
    from lora_studio.engine.run import train

    tok = load_tokenizer("bundled")
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    assert base_model_id("bundled") == BUNDLED_HUB_ID
    rows = [json.loads(x) for x in open("examples/json_answers.jsonl").read().splitlines()[:16]]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    status = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), max_steps=3, batch_size=4, max_seq_len=96, lr=1e-3))
    assert status["state"] == "done", status.get("error")
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < l < 20 for l in losses) and losses[-1] < losses[0]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BUNDLED_HUB_ID


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"could not load .*'nobody-here/no-such-model'.*HF_HUB_OFFLINE"):
        load_tokenizer("nobody-here/no-such-model")
    with pytest.raises(ValueError, match=r"could not load model 'nobody-here/no-such-model'"):
        load_model("nobody-here/no-such-model")
