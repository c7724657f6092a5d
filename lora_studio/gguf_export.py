"""GGUF files for llama.cpp, Ollama and LM Studio, written in Python with the `gguf` package.

The merged model is streamed to the file one tensor at a time: the header is written from the
tensors' shapes and types first, then each tensor is converted (f16, bf16, or q8_0 quantized
here in numpy) and written before the next one is touched. So an export holds the merged model
once in memory plus one converted tensor, and writes no intermediate folder.

The layout follows llama.cpp's own converter (convert_hf_to_gguf.py) for the families below:
tensor names from gguf's name map, Llama's rotary q/k row permutation, Gemma's norm weights
stored as 1 + w, and the tokenizer as llama.cpp's metadata (vocabulary, merges, token types,
special ids, and the chat template under `tokenizer.chat_template`).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

QUANTS = ("f16", "bf16", "q8_0")

# transformers model_type -> llama.cpp architecture. Mistral is written as llama, as llama.cpp does.
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
FAMILY_NAMES = "Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3"

Progress = Callable[[float, str], None]


class UnsupportedModel(ValueError):
    """A model family this exporter cannot write."""


def gguf_arch(config: Any) -> str:
    """The llama.cpp architecture for a transformers config, or a clear refusal."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"GGUF export supports the {FAMILY_NAMES} families; this model is {model_type!r}. "
            "Export the merged model or the adapter instead."
        )
    if model_type == "gemma3" and hasattr(config, "text_config"):
        raise UnsupportedModel("GGUF export of Gemma 3 takes the text-only model (Gemma3ForCausalLM)")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise UnsupportedModel(f"GGUF export does not handle rope scaling {rope.get('rope_type')!r} yet")
    return FAMILIES[model_type]


def _rope(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:  # per layer type (Gemma 3)
        params = params[layer_type]
    return dict(params)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---------------------------------------------------------------- tensors


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary layout: each head's rows interleaved (its `LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_plan(model: nn.Module, arch: str) -> list[tuple[str, str]]:
    """(gguf name, hf name) of every tensor to write, in state-dict order."""
    import gguf

    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = []
    for hf_name in model.state_dict():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads a missing `output.weight` as tied to the embedding
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(stem)
        if gguf_name is None:
            raise UnsupportedModel(f"GGUF export: no llama.cpp name for tensor {hf_name} ({arch})")
        plan.append((f"{gguf_name}.{suffix}", hf_name))
    return plan


def _prepare(tensor: torch.Tensor, gguf_name: str, config: Any, arch: str) -> torch.Tensor:
    """The tensor as llama.cpp stores it (float32, before the file's own type)."""
    t = tensor.detach().to(torch.float32)
    if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config.num_attention_heads
        if gguf_name.endswith("attn_k.weight"):
            heads = config.num_key_value_heads or heads
        t = _permute(t, heads)
    if arch in ("gemma2", "gemma3") and gguf_name.endswith("norm.weight"):
        t = t + 1  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
    return t


def _file_type(name: str, shape: tuple[int, ...], quant: str):
    """The GGML type of one tensor: vectors stay f32, and q8_0 falls back to f16 on odd widths."""
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2:
        return T.F32
    if quant == "q8_0":
        return T.Q8_0 if shape[-1] % 32 == 0 else T.F16
    return T.BF16 if quant == "bf16" else T.F16


def _convert(t: torch.Tensor, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.F32:
        return t.numpy()
    if qtype == T.F16:
        return t.to(torch.float16).numpy()
    if qtype == T.BF16:  # round to nearest even, as torch does; stored as raw bytes
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    return quants.quantize(t.numpy(), qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


# ---------------------------------------------------------------- metadata


def add_origin_kv(w: Any, base_id: str | None, quant: str) -> None:
    """The keys a model file and a LoRA adapter file share: the base model it came from, and its
    file type and quantization version."""
    import gguf

    if base_id:
        w.add_base_model_count(1)
        w.add_base_model_name(0, base_id)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])  # fmt: skip
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _architecture_kv(w: Any, config: Any, arch: str) -> None:
    head_dim = _head_dim(config)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(config.num_key_value_heads or config.num_attention_heads))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(int(config.vocab_size))
    rope = _rope(config)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads or arch in ("qwen3", "gemma2", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in ("gemma2", "gemma3"):
        if getattr(config, "sliding_window", None):
            w.add_sliding_window(int(config.sliding_window))
    if arch == "gemma2":
        if config.attn_logit_softcapping is not None:
            w.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if config.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _llama3_rope_freqs(config: Any) -> torch.Tensor | None:
    """The per-frequency factors llama.cpp needs for Llama 3.1+ rope scaling (`rope_freqs.weight`)."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    import math

    base = float(rope.get("rope_theta", 10000.0))
    dim = _head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _pre_tokenizer_name(tok_json: dict[str, Any], base_id: str) -> str:
    """llama.cpp's name for how text is split before BPE (`tokenizer.ggml.pre`)."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2

    llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    if "smollm" in base_id.lower():
        return "smollm"
    text = json.dumps(tok_json.get("pre_tokenizer"))
    if json.dumps(llama3)[1:-1] in text:
        return "llama-bpe"
    if json.dumps(QWEN2)[1:-1] in text:
        return "qwen2"
    if '"individual_digits": true' in text:
        return "smollm"
    return "gpt-2"


def _tokenizer_kv(w: Any, tokenizer: Any, vocab_size: int, base_id: str, chat_template: str | None) -> None:
    """llama.cpp's tokenizer metadata, from the fast tokenizer's own tokenizer.json."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="lora-studio-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        tok_json = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    model = tok_json["model"]
    if model.get("type") != "BPE":
        raise UnsupportedModel(f"GGUF export handles BPE tokenizers; this one is {model.get('type')!r}")
    spm = bool(model.get("byte_fallback"))  # sentencepiece-style BPE (Llama 2, Mistral, Gemma)
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    if len(by_id) > vocab_size:
        raise ValueError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings")
    tokens, types, scores = [], [], []
    ranks: dict[str, int] = {}
    if spm:
        for rank, merge in enumerate(model.get("merges") or []):
            pair = merge if isinstance(merge, list) else merge.split(" ")
            ranks.setdefault("".join(pair), rank)
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:  # the embedding matrix is padded past the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1000.0)
            continue
        tokens.append(text)
        if text in added:
            types.append(gguf.TokenType.CONTROL if added[text].special else gguf.TokenType.USER_DEFINED)
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(gguf.TokenType.BYTE)
        elif spm and text == model.get("unk_token"):
            types.append(gguf.TokenType.UNKNOWN)
        else:
            types.append(gguf.TokenType.NORMAL)
        # llama.cpp's sentencepiece tokenizer merges the pair with the highest score first
        scores.append(-float(ranks[text]) if text in ranks else 0.0)
    if spm:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores(scores)
        w.add_add_space_prefix('"prepend_scheme": "first"' in json.dumps(tok_json) or "Prepend" in json.dumps(tok_json))
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_tokenizer_name(tok_json, base_id))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special.chat_template = None  # ours is written below: the one the run trained with
    for kind in ("bos", "eos", "pad", "unk"):  # the ids the run trained with win over the files'
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            special.special_token_ids[kind] = int(token_id)
    special.add_to_gguf(w, quiet=True)
    keys = gguf.Keys.Tokenizer
    if keys.ADD_BOS not in w.kv_data[0]:
        w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        w.add_chat_template(template)


# ---------------------------------------------------------------- writing


def write_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    quant: str = "f16",
    *,
    name: str = "model",
    base_id: str = "",
    chat_template: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write `model` (a plain transformers causal LM, adapters merged) as one GGUF file.

    Streams tensor by tensor; written to a temporary name and renamed, so a failure leaves no
    half-written file under `path`.
    """
    import gguf

    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)} (got {quant!r})")
    config = model.config
    arch = gguf_arch(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = _tensor_plan(model, arch)
    state = model.state_dict()
    extra = {}
    freqs = _llama3_rope_freqs(config)
    if freqs is not None:
        extra["rope_freqs.weight"] = freqs
    w = gguf.GGUFWriter(None, arch)
    w.add_type(gguf.GGUFType.MODEL)
    # transformers reads a llama-architecture file named exactly "mistral" as Mistral and then fails
    w.add_name(f"{name} (merged)" if name == "mistral" else name)
    add_origin_kv(w, base_id, quant)
    _architecture_kv(w, config, arch)
    _tokenizer_kv(w, tokenizer, int(config.vocab_size), base_id, chat_template)

    types = {}
    for gguf_name, hf_name in plan:
        shape = tuple(state[hf_name].shape)
        qtype = _file_type(gguf_name, shape, quant)
        types[gguf_name] = qtype
        w.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
    for gguf_name, t in extra.items():
        types[gguf_name] = gguf.GGMLQuantizationType.F32
        w.add_tensor_info(gguf_name, tuple(t.shape), np.dtype(np.float32), t.numel() * 4, raw_dtype=types[gguf_name])

    tmp = path.with_name("." + path.name + ".tmp")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total = len(plan) + len(extra)
        for i, (gguf_name, t) in enumerate(_stream(plan, state, config, arch, extra)):
            w.write_tensor_data(_convert(t, types[gguf_name]))
            if progress and (i % 8 == 0 or i == total - 1):
                progress((i + 1) / total, f"writing {gguf_name}")
        w.close()
        tmp.replace(path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return path


def _stream(plan, state, config, arch, extra) -> Iterator[tuple[str, torch.Tensor]]:
    """One converted tensor at a time, so the file never needs a second copy of the model."""
    for gguf_name, hf_name in plan:
        yield gguf_name, _prepare(state[hf_name], gguf_name, config, arch)
    yield from extra.items()


# ---------------------------------------------------------------- Ollama


_SENTINEL = "\u2402{}\u2403"  # text no chat template writes itself


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def ollama_template(tokenizer: Any) -> tuple[str, list[str]]:
    """The chat template as an Ollama (Go) TEMPLATE, and the stop strings it implies.

    Learned by rendering the Jinja template on marked messages: what each role writes before
    and after its content, what a conversation without a system message gets first (SmolLM
    writes a default system turn), and the assistant prompt. A BOS the template writes is left
    out: llama.cpp adds it itself when the file asks for one.
    """
    x = _SENTINEL.format("X")
    bos = getattr(tokenizer, "bos_token", None) or ""

    def cut_bos(text: str) -> str:
        return text[len(bos):] if bos and text.startswith(bos) and getattr(tokenizer, "add_bos_token", False) else text

    parts: dict[str, tuple[str, str]] = {}
    try:
        head = _render(tokenizer, [{"role": "system", "content": x}])
        pre, post = head.split(x)
        parts["system"] = (cut_bos(pre), post)
        context = [{"role": "system", "content": x}]
    except Exception:  # noqa: BLE001 - a template that refuses a system turn (Gemma): system folded into user
        head, context = "", []
    for role in ("user", "assistant"):
        convo = [*context, {"role": "user", "content": x}] if role == "assistant" else context
        before = _render(tokenizer, convo) if convo else ""
        text = _render(tokenizer, [*convo, {"role": role, "content": x}])
        if not text.startswith(before):
            raise ValueError(f"cannot translate this chat template for Ollama (the {role} turn rewrites earlier turns)")
        pre, post = text[len(before):].split(x)
        parts[role] = (cut_bos(pre) if not before else pre, post)
    first = _render(tokenizer, [{"role": "user", "content": x}])
    default_head = cut_bos(first[: first.index(x)])
    if default_head.endswith(parts["user"][0]):
        default_head = default_head[: len(default_head) - len(parts["user"][0])]
    convo = [*context, {"role": "user", "content": x}]
    generation = _render(tokenizer, convo, generation=True)[len(_render(tokenizer, convo)):]
    # One line of actions with no whitespace trimming: the text parts keep their own newlines.
    out = []
    if default_head and "system" in parts:
        out.append(f'{{{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}}}{default_head}{{{{ end }}}}')
    out.append("{{ range .Messages }}")
    for i, (role, (pre, post)) in enumerate(parts.items()):
        out.append(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{post}')
    out.append("{{ end }}{{ end }}")
    out.append(generation)
    stops = []
    for token in (parts["assistant"][1].strip(), getattr(tokenizer, "eos_token", None)):
        if token and token not in stops:
            stops.append(token)
    return "".join(out), stops


def modelfile(gguf_name: str, tokenizer: Any, generation: dict[str, Any], system_prompt: str | None) -> str:
    """An Ollama Modelfile for the GGUF beside it: FROM, TEMPLATE, stops, the run's sampling settings."""
    template, stops = ollama_template(tokenizer)
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{template}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    temperature = float(generation.get("temperature", 0.0))
    lines.append(f"PARAMETER temperature {temperature:g}")
    if temperature > 0:
        lines.append(f"PARAMETER top_p {float(generation.get('top_p', 1.0)):g}")
    else:
        lines.append("PARAMETER top_k 1")  # greedy, as the run's chat and compare tabs answer
    if generation.get("max_new_tokens"):
        lines.append(f"PARAMETER num_predict {int(generation['max_new_tokens'])}")
    if system_prompt:
        lines += ["", f'SYSTEM """{system_prompt}"""']
    return "\n".join(lines) + "\n"
