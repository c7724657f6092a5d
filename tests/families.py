"""Tiny random models of the common model families, built from a config (nothing downloaded).

Each family is the smallest config that still has the family's own layout: its attention
(GQA, sliding window, soft-capping, q/k norms), its MLP (gated, fused up-gate, MoE router and
experts), tied or untied embeddings, and its own linear names. Weights are drawn with a large
`initializer_range` so a few steps of a tiny adapter move the logits measurably.
"""

from __future__ import annotations

from typing import Callable

import torch
import transformers as tf

# Shapes every family shares: hidden 32, 4 heads of 8, 2 KV heads, 2 layers.
_COMMON = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama(**kw):
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**_COMMON, "tie_word_embeddings": False, **kw}))


def _gpt2(**kw):
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                            initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _moe(config_cls, model_cls, **kw):
    return model_cls(config_cls(**{**_COMMON, **kw}))


FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": _llama,
    "llama-tied": lambda: _llama(tie_word_embeddings=True),
    "gpt2": _gpt2,
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_COMMON, tie_word_embeddings=False)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_COMMON, head_dim=8, tie_word_embeddings=False)),
    "qwen3-moe": lambda: _moe(tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, head_dim=8, num_experts=4,
                              num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_COMMON, sliding_window=16)),
    "mixtral": lambda: _moe(tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_COMMON, head_dim=8, sliding_window=16)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=16)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_COMMON)),
    "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**_COMMON)),
    "granite": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**_COMMON)),
    "smollm3": lambda: tf.SmolLM3ForCausalLM(tf.SmolLM3Config(**_COMMON)),
    "gpt-neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**{
        **_COMMON, "num_key_value_heads": 4, "tie_word_embeddings": False})),
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(
        vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
        num_kv_heads=2, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family]()
