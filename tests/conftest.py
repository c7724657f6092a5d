"""Shared fixtures: tiny random models built from a config, a tiny BPE tokenizer built here,
and small instruction files written by the tests. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

# One intra-op thread, here and in every process a test starts (apps, supervisors, workers):
# the tests' tiny models gain nothing from a second thread, and with a test, an app and a
# worker all busy on 2 cores, threads that spin-wait for each other made the suite ~3x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Answer in the format ANSWER: followed by the reply.",
    "What is the capital of France? Paris is the capital.",
    "hello world this is a small test of a tiny tokenizer",
    "The quick brown fox jumps over the lazy dog 0123456789",
    "user assistant system instruction input output",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tok.chat_template = CHATML
    return tok


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.3,  # larger than default so a frozen LM head lets a tiny LoRA move the loss
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
        eos_token_id=2, bos_token_id=1, pad_token_id=0, initializer_range=0.3,
    )
    return GPT2LMHeadModel(config)


@pytest.fixture(autouse=True)
def _all_cores_for_the_bundled_model(request):
    """Tests marked slow run the real 135M model in this process: there a second thread pays."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def _save(model, tok, path: Path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> str:
    return _save(tiny_llama(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer) -> str:
    return _save(tiny_gpt2(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model_dir(request, tiny_llama_dir, tiny_gpt2_dir) -> str:
    return tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def format_rows(n: int = 24) -> list[dict]:
    """A learnable task: always answer 'ANSWER: <word>' with the instruction's last word."""
    words = ["Paris", "hello", "world", "fox", "dog", "test", "small", "tiny"]
    return [
        {"instruction": f"Say the word {words[i % len(words)]}", "input": "", "output": f"ANSWER: {words[i % len(words)]}"}
        for i in range(n)
    ]


@pytest.fixture
def train_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", format_rows())
