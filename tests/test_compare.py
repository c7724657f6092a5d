"""Headless end to end on a tiny model: CLI train writes the run folder, CLI compare answers
each prompt with the base (adapter off) and the tuned model (adapter on) from one model."""

from __future__ import annotations

import json

import pytest
import torch

from lora_studio.adapters import load_adapter
from lora_studio.cli import main
from lora_studio.compare import GenerationSettings, TunedModel, read_prompts
from lora_studio.data import DataError
from lora_studio.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama_dir):
    from tests.conftest import format_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("run")
    data = write_jsonl(tmp / "train.jsonl", format_rows(32))
    run = tmp / "run"
    code = main(["train", "--data", str(data), "--out", str(run), "--model", tiny_llama_dir,
                 "--lr", "1e-2", "--epochs", "4", "--batch-size", "8", "--rank", "8"])
    assert code == 0
    return run


def test_train_writes_the_run_folder(trained_run):
    status = json.loads((trained_run / "status.json").read_text())
    assert status["state"] == "done" and status["error"] is None and status["step"] == status["total_steps"] == 16
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 17))
    for key in ("loss", "lr", "tokens_per_s", "elapsed_s", "rss_mb", "peak_rss_mb"):
        assert all(isinstance(r[key], float) for r in rows), key
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.5 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    config = json.loads((trained_run / "config.json").read_text())
    assert config["rank"] == 8 and config["alpha"] == 16.0 and config["lr"] == 1e-2
    assert (trained_run / "adapter" / "adapter_model.safetensors").exists()


def test_config_json_repeats_the_run(trained_run, tmp_path):
    again = tmp_path / "again"
    assert main(["train", "--config", str(trained_run / "config.json"), "--out", str(again)]) == 0
    loss = lambda run: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert loss(again) == loss(trained_run)


def _greedy(model, tok, prompt: str, n: int = 12) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_compare_cli_base_and_tuned(trained_run, tiny_llama_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say the word Paris\nSay the word fox\n")
    out = tmp_path / "out.jsonl"
    assert main(["compare", "--run", str(trained_run), "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "12"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Say the word Paris", "Say the word fox"]
    tok = load_tokenizer(tiny_llama_dir)
    base = load_model(tiny_llama_dir)
    tuned = load_model(tiny_llama_dir)
    load_adapter(tuned, trained_run / "adapter")
    for row in rows:
        assert row["base"] == _greedy(base, tok, row["prompt"])  # adapter really off
        assert row["tuned"] == _greedy(tuned, tok, row["prompt"])  # adapter really on
    assert any(r["tuned"].startswith("ANSWER:") for r in rows)  # it learned the format
    assert not any(r["base"].startswith("ANSWER:") for r in rows)


def test_one_model_in_memory(trained_run):
    tuned = TunedModel(trained_run)
    models = [m for m in vars(tuned).values() if isinstance(m, torch.nn.Module)]
    assert len(models) == 1
    settings = GenerationSettings(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    assert tuned.reply("Say the word dog", True, settings) == tuned.reply("Say the word dog", True, settings)


def test_read_prompts_formats_and_errors(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, row 2, field 'prompt'"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="file not found"):
        read_prompts(tmp_path / "missing.txt")


def test_generation_settings_are_saved_with_the_run_and_reused(trained_run, tmp_path):
    record = json.loads((trained_run / "adapter" / "lora_studio.json").read_text())
    assert record["generation"] == {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    # A run whose record asks for other settings: compare uses them unless flags override.
    record["generation"] = {"max_new_tokens": 3, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    (trained_run / "adapter" / "lora_studio.json").write_text(json.dumps(record))
    try:
        tuned = TunedModel(trained_run)
        assert tuned.generation.max_new_tokens == 3
        assert tuned.generate_kwargs(torch.ones(1, 2, dtype=torch.long))["max_new_tokens"] == 3
        prompts = tmp_path / "p.txt"
        prompts.write_text("Say the word dog\n")
        out = tmp_path / "o.jsonl"
        assert main(["compare", "--run", str(trained_run), "--prompts", str(prompts), "--out", str(out)]) == 0
        row = json.loads(out.read_text())
        assert len(tuned.tokenizer(row["tuned"], add_special_tokens=False)["input_ids"]) <= 3
    finally:
        record["generation"]["max_new_tokens"] = 128
        (trained_run / "adapter" / "lora_studio.json").write_text(json.dumps(record))


def test_default_generation_follows_a_sampling_model_config():
    from transformers import GenerationConfig

    from lora_studio.compare import default_generation

    class M(torch.nn.Module):
        generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=64)

    g = default_generation(M())
    assert (g.temperature, g.top_p, g.max_new_tokens) == (0.7, 0.9, 64)
    M.generation_config = GenerationConfig()
    assert default_generation(M()).temperature == 0.0
