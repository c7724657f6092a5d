"""GGUF export: each supported family round-trips through transformers' GGUF loader with the
same greedy replies (f16/bf16 exactly, q8_0 closely, agreement printed); the tokenizer and the
run's chat template travel in the file; other families are refused by name; the file is
streamed; the Ollama Modelfile's TEMPLATE renders conversations as the chat template does."""

from __future__ import annotations

import copy
import re
import tracemalloc
from pathlib import Path

import pytest
import torch
import transformers as tf

from lora_studio import gguf_export
from tests.families import _COMMON, build

PROMPTS = ["hello world", "What is the capital of France?", "Say the word fox"]


def qwen3():
    # transformers' GGUF reader leaves Qwen3's head_dim at its default, 128 (every released Qwen3's)
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**{**_COMMON, "head_dim": 128, "tie_word_embeddings": False}))


def family(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "qwen3":
        return qwen3().eval()
    if name == "mistral":
        # llama.cpp writes Mistral as llama, without a sliding window (Mistral 7B v0.2+ has none);
        # transformers loads it back as LlamaForCausalLM
        return tf.MistralForCausalLM(tf.MistralConfig(**_COMMON, sliding_window=None)).eval()
    return build(name).eval()


def rounded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model as the file stores it: matrices in `dtype`, vectors (norms, biases) in f32."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() >= 2:
                p.copy_(p.to(dtype).float())
    return out


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int = 8) -> list[int]:
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0,
        eos_token_id=None, temperature=None, top_p=None, top_k=None,
    )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def load_back(path: Path):
    model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
@pytest.mark.parametrize("quant,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_family_round_trips_with_identical_greedy_replies(name, quant, dtype, tokenizer, tmp_path):
    model = family(name)
    path = gguf_export.write_gguf(model, tokenizer, tmp_path / "m.gguf", quant, name=name)
    back, back_tok = load_back(path)
    reference = rounded(model, dtype)
    for prompt in PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        assert back_tok(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
        assert greedy(back, ids) == greedy(reference, ids), (name, quant, prompt)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_q8_0_is_close_and_the_agreement_is_printed(name, tokenizer, tmp_path, capsys):
    model = family(name)
    f16 = gguf_export.write_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16")
    q8 = gguf_export.write_gguf(model, tokenizer, tmp_path / "q8.gguf", "q8_0")
    assert q8.stat().st_size < f16.stat().st_size
    back, _ = load_back(q8)
    tokens, same = 0, 0
    for prompt in PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        with torch.no_grad():
            a, b = model(ids).logits, back(ids).logits
        # int8 blocks of 32 with an f16 scale: a few percent of the logits' norm on these
        # deliberately large random weights (measured 1-5%)
        assert (a - b).norm() / a.norm() < 0.08
        ref, got = greedy(model, ids), greedy(back, ids)
        tokens += len(ref)
        same += sum(x == y for x, y in zip(ref, got))
    with capsys.disabled():
        print(f"\n[q8_0 {name}] greedy token agreement with the f32 model: {same}/{tokens} = {same / tokens:.1%}")
    assert same / tokens >= 0.7


@pytest.mark.parametrize("name", ["gpt2", "phi3", "falcon"])
def test_other_families_are_refused_naming_the_supported_ones(name, tokenizer, tmp_path):
    with pytest.raises(gguf_export.UnsupportedModel, match="Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3"):
        gguf_export.write_gguf(family(name), tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_metadata_llama_cpp_and_ollama_read(tokenizer, tmp_path):
    from gguf import GGUFReader

    tok = copy.deepcopy(tokenizer)
    template = tok.chat_template + "{# trained with this one #}"
    path = gguf_export.write_gguf(family("llama"), tok, tmp_path / "m.gguf", name="run-1", chat_template=template)
    fields = GGUFReader(str(path)).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "llama" and value("general.name") == "run-1"
    assert value("tokenizer.chat_template") == template
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.tokens") == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert value("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert value("llama.block_count") == 2 and value("llama.attention.head_count_kv") == 2
    assert value("general.file_type") == 1  # MOSTLY_F16
    # the special tokens are CONTROL (3), the others NORMAL (1)
    types = value("tokenizer.ggml.token_type")
    assert [types[i] for i in tok.all_special_ids] == [3] * len(tok.all_special_ids) and types[100] == 1


def test_the_file_is_streamed_one_tensor_at_a_time(tokenizer, tmp_path):
    """numpy buffers (the converted tensors) are traced: the peak stays near the largest one,
    far below the whole model in f16."""
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**_COMMON, "hidden_size": 128, "intermediate_size": 256,
                                                   "num_hidden_layers": 6, "tie_word_embeddings": False}))
    total = sum(p.numel() for p in model.parameters()) * 2
    largest = max(p.numel() for p in model.parameters()) * 2
    tracemalloc.start()
    try:
        gguf_export.write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 8 * largest
    assert peak < total / 2, f"peak {peak} bytes while writing a {total}-byte model"


def test_a_failed_write_leaves_no_file(tokenizer, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_export, "_convert", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_export.write_gguf(family("llama"), tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- Ollama's TEMPLATE


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """A renderer for the subset of Go templates `ollama_template` writes (if/else if/range/index/ne/or/not)."""
    out: list[str] = []
    stack: list[dict] = []  # open blocks
    program = re.split(r"(\{\{.*?\}\})", template)

    def active() -> bool:
        return all(b["on"] for b in stack)

    def cond(expr: str, msg: dict | None) -> bool:
        if expr.startswith("eq .Role "):
            return msg is not None and msg["role"] == expr.split('"')[1]
        if expr == 'or (not .Messages) (ne (index .Messages 0).Role "system")':
            return not messages or messages[0]["role"] != "system"
        raise AssertionError(f"unexpected condition {expr}")

    def run(start: int, msg: dict | None) -> int:
        i = start
        while i < len(program):
            part = program[i]
            if not part.startswith("{{"):
                if active():
                    out.append(part)
                i += 1
                continue
            action = part[2:-2].strip()
            if action == "range .Messages":
                body = i + 1
                end = None
                if active():
                    for m in messages:
                        stack.append({"on": True, "range": True})
                        end = run(body, m)
                        stack.pop()
                if end is None:
                    stack.append({"on": False, "range": True})
                    end = run(body, msg)
                    stack.pop()
                i = end + 1
                continue
            if action == "end":
                if stack and stack[-1].get("range"):
                    return i
                stack.pop()
            elif action.startswith("if "):
                hit = cond(action[3:], msg)
                stack.append({"on": hit, "done": hit})
            elif action.startswith("else if "):
                block = stack[-1]
                hit = not block["done"] and cond(action[8:], msg)
                block["on"], block["done"] = hit, block["done"] or hit
            elif action == ".Content":
                if active():
                    out.append(msg["content"])
            else:
                raise AssertionError(f"unexpected action {action}")
            i += 1
        return i

    run(0, None)
    return "".join(out)


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]


@pytest.mark.parametrize("which", ["chatml", "smollm"])
def test_ollama_template_renders_like_the_chat_template(which, tokenizer):
    tok = copy.deepcopy(tokenizer)
    if which == "smollm":  # SmolLM2's template: a default system turn when none is given
        tok.chat_template = (
            "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        )
    template, stops = gguf_export.ollama_template(tok)
    for messages in CONVERSATIONS:
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_go(template, messages) == expected
    assert stops == ["<|im_end|>"]


def test_modelfile_carries_the_runs_settings(tokenizer):
    text = gguf_export.modelfile("run.f16.gguf", tokenizer, {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64}, "Be brief.")
    lines = text.splitlines()
    assert lines[0] == "FROM ./run.f16.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER temperature 0.7" in lines
    assert "PARAMETER top_p 0.9" in lines and "PARAMETER num_predict 64" in lines
    assert 'SYSTEM """Be brief."""' in lines and text.count('TEMPLATE """') == 1
    greedy_file = gguf_export.modelfile("m.gguf", tokenizer, {}, None)
    assert "PARAMETER temperature 0" in greedy_file and "PARAMETER top_k 1" in greedy_file and "SYSTEM" not in greedy_file


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16"])  # q8_0's agreement is checked on the tiny models (a minute less here)
def test_bundled_model_round_trips(quant, tmp_path, capsys):
    """SmolLM2-135M-Instruct (the bundled model): the f16 file answers exactly as the model at f16
    precision. Most of the time is transformers dequantizing."""
    from lora_studio.models import BUNDLED_HUB_ID, load_model, load_tokenizer

    model, tok = load_model("bundled"), load_tokenizer("bundled")
    path = gguf_export.write_gguf(model, tok, tmp_path / f"smol.{quant}.gguf", quant, base_id=BUNDLED_HUB_ID)
    back, back_tok = load_back(path)
    reference = rounded(model, torch.float16) if quant == "f16" else model
    ids = prompt_ids(tok, "What is the capital of France?")
    assert prompt_ids(back_tok, "What is the capital of France?").tolist() == ids.tolist()
    want, got = greedy(reference, ids, 12), greedy(back, ids, 12)
    same = sum(x == y for x, y in zip(want, got))
    with capsys.disabled():
        print(f"\n[gguf {quant}, bundled SmolLM2-135M] greedy agreement: {same}/{len(want)} = {same / len(want):.1%}")
    if quant == "f16":
        assert got == want
    assert same / len(want) >= 0.7
