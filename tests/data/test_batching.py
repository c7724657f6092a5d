"""Batching: packing gives the loss and gradients of the same samples run one by one (and
the attention implementations really honour it); length grouping; the validation split."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lora_studio.data import (
    IGNORE_INDEX,
    Example,
    check_packing,
    collate,
    length_grouped_batches,
    load_examples,
    model_inputs,
    pack_examples,
    split_examples,
)
from lora_studio.models import load_model
from lora_studio.engine.loss import causal_lm_loss

WORDS = ["Paris", "hello", "world", "fox", "dog", "test", "small", "tiny"]


@pytest.fixture
def examples(tmp_path, tokenizer) -> list[Example]:
    rows = [
        {"instruction": f"Say the word {w} " + "please " * (i % 4), "output": f"ANSWER: {w} " * (1 + i % 3)}
        for i, w in enumerate(WORDS)
    ]
    rows.append({"text": "The quick brown fox jumps over the lazy dog"})  # a text row: no masked prompt
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    text_path = tmp_path / "t.jsonl"
    text_path.write_text(json.dumps(rows[-1]) + "\n")
    chat, _ = load_examples(path, tokenizer, max_seq_len=128)
    text, _ = load_examples(text_path, tokenizer, max_seq_len=128)
    return chat + text


def test_pack_examples_keeps_every_token_within_max_len(examples):
    max_len = 96
    packed = pack_examples(examples, max_len)
    assert len(packed) < len(examples)
    assert all(len(p.input_ids) <= max_len for p in packed)
    assert sorted(t for p in packed for t in p.input_ids) == sorted(t for e in examples for t in e.input_ids)
    for p in packed:
        starts = [i for i, pos in enumerate(p.position_ids) if pos == 0]
        assert all(p.labels[s] == IGNORE_INDEX for s in starts)  # never predicted across samples
        assert len(p.position_ids) == len(p.input_ids)
    trained = sum(e.n_trained - (e.labels[0] != IGNORE_INDEX) for e in examples)
    assert sum(p.n_trained for p in packed) == trained


def test_collate_packed_rows_pad_as_a_segment_of_their_own():
    a = Example([5, 6, 7, 8, 9], [IGNORE_INDEX, 6, 7, 8, 9], position_ids=[0, 1, 2, 0, 1])
    b = Example([5, 6], [IGNORE_INDEX, 6], position_ids=[0, 1])
    batch = collate([a, b], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert set(model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}
    assert "position_ids" not in collate([Example([1, 2], [1, 2])], 0)


def _model(model_dir: str, impl: str) -> nn.Module:
    model = load_model(model_dir)
    model.set_attn_implementation(impl)
    model.eval()  # no dropout: the two runs must see the same function
    return model


def _loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    total, count = torch.zeros(()), 0
    for batch in batches:
        loss, n = causal_lm_loss(model, batch)
        loss.backward()
        total, count = total + loss.detach(), count + n
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return total, count, grads


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_batch_equals_samples_one_by_one(tiny_model_dir, examples, tokenizer, impl):
    model = _model(tiny_model_dir, impl)
    pad = tokenizer.pad_token_id
    packed = pack_examples(examples, 96)
    assert any(len(set(p.position_ids)) < len(p.position_ids) for p in packed)  # rows really hold several samples
    loss_p, n_p, grads_p = _loss_and_grads(model, [collate(packed, pad)])
    loss_s, n_s, grads_s = _loss_and_grads(model, [collate([e], pad) for e in examples])
    assert n_p == n_s
    torch.testing.assert_close(loss_p, loss_s, rtol=1e-5, atol=1e-4)
    assert grads_p.keys() == grads_s.keys() and grads_p
    for name in grads_s:
        # The gradients reach ~40 here; the two layouts sum in different orders (the AVX-512 sdpa
        # kernel differs most), so near-zero entries may differ by a few ulps of the tensor's
        # largest one. A wrong layout is off by O(1) of it.
        atol = max(1e-5, 4e-6 * float(grads_s[name].abs().max()))
        torch.testing.assert_close(grads_p[name], grads_s[name], rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def test_a_2d_mask_would_let_packed_samples_see_each_other(tiny_llama_dir, examples, tokenizer):
    """Why model_inputs drops the mask for packed rows: transformers only builds the
    block-diagonal mask from position ids when no 2D mask is given."""
    model = _model(tiny_llama_dir, "sdpa")
    batch = collate(pack_examples(examples, 96), tokenizer.pad_token_id)
    with torch.no_grad():
        right = model(**model_inputs(batch)).logits
        wrong = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(right, wrong, atol=1e-3)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_check_packing_accepts_models_that_honour_it(tiny_model_dir, impl):
    model = _model(tiny_model_dir, impl)
    model.train()
    check_packing(model)
    assert model.training  # the probe restores the mode


class IgnoresPositions(nn.Module):
    """A model whose forward drops position ids: packed samples would attend to each other."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_check_packing_refuses_models_that_ignore_it(tiny_llama_dir):
    with pytest.raises(ValueError, match="packing is not supported by this model"):
        check_packing(IgnoresPositions(_model(tiny_llama_dir, "sdpa")))


def test_length_grouped_batches_cover_every_example_once():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47]
    batches = length_grouped_batches(lengths, 2, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(8))
    spreads = [abs(lengths[b[0]] - lengths[b[-1]]) for b in batches]
    assert max(spreads) <= 1  # short with short, long with long


def test_split_examples_is_deterministic_disjoint_and_keeps_order():
    examples = [Example([i], [i], row=i) for i in range(1, 21)]
    train, val = split_examples(examples, 0.2, seed=3)
    again = split_examples(examples, 0.2, seed=3)
    assert [e.row for e in val] == [e.row for e in again[1]]
    assert len(val) == 4 and len(train) == 16
    assert sorted(e.row for e in train + val) == list(range(1, 21))
    assert [e.row for e in train] == sorted(e.row for e in train)
    assert split_examples(examples, 0.2, seed=4)[1] != val
    assert len(split_examples(examples[:3], 0.01, 0)[1]) == 1  # at least one held out
    assert split_examples(examples, 0.0, 0) == (examples, [])
