"""A run's adapter as a GGUF LoRA adapter that llama.cpp applies to the base model's GGUF
(`llama-cli -m base.gguf --lora adapter.gguf`, Ollama's `ADAPTER`).

The layout is the one llama.cpp's `convert_lora_to_gguf.py` writes and `llama-adapter.cpp` checks:
  - `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (float32), and
    `general.architecture` equal to the base GGUF's (llama.cpp refuses a mismatch);
  - per adapted weight, `<base gguf tensor name>.lora_a` and `.lora_b`, e.g. `blk.0.attn_q.weight.lora_a`;
  - shapes, in numpy (row-major) order: lora_a (rank, in), lora_b (out, rank), i.e. peft's own
    layout; gguf's writer stores them reversed, so in ggml's `ne` order a = [in, rank] and
    b = [rank, out], which is what the loader compares with the base tensor's [in, out].
llama.cpp applies W x + (alpha / rank) · B (A x) with rank = lora_b's ne[0], so alpha is written as
rank · s with s the scale the run trained with (alpha / r, or alpha / √r with rsLoRA).
Llama's q/k rows are permuted in its GGUF (see gguf_export._permute); B's rows are permuted the same
way, since permuting the rows of B·A is permuting the rows of B.

Only adapters that are a plain W + s·B·A can be written: LoRA, and the methods whose export is one
(Delta-LoRA exports a plain LoRA of rank 2r; LoRA+, LoRA-FA and LoRA-Pro only train differently).
DoRA's magnitude rescaling and VeRA's shared projections have no llama.cpp LoRA form.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from lora_studio import gguf_export
from lora_studio.methods import REGISTRY, method_for_peft_config

PLAIN_LORAS = [m for m in REGISTRY.values() if m.plain_lora]
"""Methods whose exported adapter is a plain peft LoRA (W + s·B·A)."""

PEFT_PREFIX = "base_model.model."


class NotAPlainLoRA(ValueError):
    """An adapter that llama.cpp's LoRA format cannot express."""


def _refuse(method: str) -> NotAPlainLoRA:
    return NotAPlainLoRA(
        f"a GGUF LoRA adapter can hold only a plain LoRA ({', '.join(m.title for m in PLAIN_LORAS)}); "
        f"this run's method is {method!r}, which llama.cpp cannot apply as a LoRA. "
        "Export a merged GGUF instead (--format gguf)."
    )


def lora_pairs(adapter_dir: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, str]:
    """{module path: (A (r, in), B (out, r))}, the scale s, and the method, from a PEFT LoRA folder.

    Refuses anything that is not a plain LoRA, naming the method.
    """
    folder = Path(adapter_dir)
    config = json.loads((folder / "adapter_config.json").read_text())
    record_path = folder / "lora_studio.json"
    by_config = method_for_peft_config(config)
    named = json.loads(record_path.read_text()).get("method") if record_path.exists() else None
    if by_config is None or not by_config.plain_lora:  # the config says DoRA, VeRA or another peft type
        named_other = named in REGISTRY and not REGISTRY[named].plain_lora
        raise _refuse(named if named_other else by_config.name if by_config else str(config.get("peft_type")))
    if named is not None and (named not in REGISTRY or not REGISTRY[named].plain_lora):
        raise _refuse(named)
    method = named or by_config.name
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise NotAPlainLoRA(f"{folder}/adapter_config.json: per-module ranks or alphas are not supported in a GGUF LoRA")
    if config.get("fan_in_fan_out"):
        raise NotAPlainLoRA("a GGUF LoRA adapter needs a model of nn.Linear layers (this one has Conv1D, GPT-2 style)")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if stem.endswith(suffix):
                pairs.setdefault(stem[: -len(suffix)], {})[part] = value
                break
        else:
            raise _refuse(f"{method} (its adapter holds {key})")
    out = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{folder}: layer {module} lacks one of lora_A / lora_B")
        a, b = pair["lora_A"].float(), pair["lora_B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{folder}: layer {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, not a LoRA pair")
        out[module] = (a, b)
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return out, scale, method


def write_gguf_lora(
    adapter_dir: str | Path,
    config: Any,
    path: str | Path,
    quant: str = "f16",
    *,
    name: str = "adapter",
    base_id: str = "",
    progress: Callable[[float, str], None] | None = None,
) -> Path:
    """Write the PEFT LoRA in `adapter_dir` (for a base with transformers `config`) as a GGUF LoRA adapter."""
    import gguf

    if quant not in gguf_export.QUANTS:
        raise ValueError(f"quant must be one of {', '.join(gguf_export.QUANTS)} (got {quant!r})")
    pairs, scale, _ = lora_pairs(adapter_dir)
    arch = gguf_export.gguf_arch(config)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise NotAPlainLoRA(f"the adapter's layers have different ranks {sorted(ranks)}; one alpha cannot scale them all")
    rank = ranks.pop()
    planned = []
    for module, (a, b) in pairs.items():
        if tied and module.endswith("lm_head"):
            raise NotAPlainLoRA("the adapter changes lm_head, which this base ties to the embeddings: llama.cpp has no tensor for it")
        gguf_name = name_map.get_name(module)
        if gguf_name is None or gguf_name.startswith("token_embd"):
            raise NotAPlainLoRA(f"no llama.cpp LoRA tensor for module {module} ({arch})")
        if arch == "llama" and gguf_name.endswith(("attn_q", "attn_k")):
            heads = config.num_attention_heads
            if gguf_name.endswith("attn_k"):
                heads = config.num_key_value_heads or heads
            b = gguf_export._permute(b, heads)
        planned.append((f"{gguf_name}.weight.lora_a", a))
        planned.append((f"{gguf_name}.weight.lora_b", b))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(None, arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp scales by alpha / rank (rank = lora_b's ne[0]): alpha = rank · s keeps the trained scale
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank * scale))
    w.add_name(name)
    gguf_export.add_origin_kv(w, base_id, quant)
    types = []
    for gguf_name, t in planned:
        shape = tuple(t.shape)
        qtype = gguf_export._file_type(gguf_name, shape, quant)
        types.append(qtype)
        w.add_tensor_info(gguf_name, shape, np.dtype(np.float32), gguf_export._nbytes(shape, qtype), raw_dtype=qtype)
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, ((gguf_name, t), qtype) in enumerate(zip(planned, types)):
            w.write_tensor_data(gguf_export._convert(t.contiguous(), qtype))
            if progress:
                progress((i + 1) / len(planned), f"writing {gguf_name}")
        w.close()
        tmp.replace(path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return path
