"""QLoRA — Dettmers, Pagnoni, Holtzman & Zettlemoyer 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs", arXiv:2305.14314.

Not a method of its own but a base: `--quantize 4bit` stores every linear weight of the
blocks as 4-bit NormalFloat (NF4, blocks of 64 weights with one absmax each, the absmax
constants themselves quantized to 8 bit: "double quantization"), and the adapter of the
chosen method (LoRA, LoRA-FA, LoRA+, LoRA-Pro, DoRA, VeRA) trains in the compute dtype on
top. The layer computes

    y = dequant(W_NF4) x + b + adapter(x)

so the output equals the same adapter over the dequantized weight (tests check exactly
that). The methods' layers compute it as one product of the dequantized W0 and their term
(`lowrank.frozen_plus_term`, in bitsandbytes' compute dtype; W0 dequantized again in backward,
never kept): in bf16 compute, as on a GPU, the term is then not rounded away on bitsandbytes'
bf16 output. The LM head and embeddings stay in full precision (transformers skips the output
head). bitsandbytes implements NF4 for CPU too, slowly.

One CPU detail: on CPUs with AVX512-BF16, bitsandbytes would repack the weights at the
first no-grad eval call into a bf16 kernel layout (absmax rounded to bf16, compute in
bf16), silently leaving the configured compute dtype; `inject_adapters` switches that off
so training, evaluation, DoRA's norm and merges all read the same NF4 weight.

Refused on a 4-bit base: Delta-LoRA (it writes W every step) and merging in place (the
update would be re-quantized onto the NF4 grid); export the adapter, or train without
--quantize for a merged model. Paper recipe: r 64, α 16, lr 2e-4, dropout 0.05-0.1,
gradient clip 0.3, LoRA on every linear layer (our all-linear default).
"""

from __future__ import annotations

import torch


def bitsandbytes_problem() -> str | None:
    """None when bitsandbytes can quantize here, else why not."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported ({e.__class__.__name__}: {e}); install bitsandbytes==0.50.2"
    return None


def quantization_config(dtype: torch.dtype = torch.float32):
    """transformers' BitsAndBytesConfig for QLoRA's base: NF4, double quantization, compute in `dtype`."""
    problem = bitsandbytes_problem()
    if problem:
        raise ValueError(f"--quantize 4bit needs bitsandbytes: {problem}")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
