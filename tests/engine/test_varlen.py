"""The variable-length (segment) attention path that packed batches take on a GPU: its plumbing
(segment bounds, positions, the swapped attention entry) runs on the CPU here with the segment
equation computed by causal SDPA per segment, against the padded call in float64; the CUDA
kernel itself against that equation where a GPU is present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_studio.data import Example, collate, pack_examples
from lora_studio.engine import speed, varlen
from tests.engine.test_speed import _lora_model, padded_reference


def test_segment_bounds_come_from_the_restarting_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]])
    cu, longest = varlen.cu_seqlens_from_positions(positions)
    assert cu.tolist() == [0, 3, 5, 9, 10] and cu.dtype == torch.int32
    assert longest == 4


def _block_causal_mask(cu: list[int], total: int) -> torch.Tensor:
    mask = torch.zeros(total, total, dtype=torch.bool)
    for a, b in zip(cu[:-1], cu[1:]):
        mask[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    return mask


def test_segment_attention_is_causal_attention_within_each_segment():
    torch.manual_seed(0)
    cu = [0, 4, 5, 11]
    q = torch.randn(11, 6, 8, dtype=torch.float64)  # (T, H, D)
    k, v = torch.randn(11, 2, 8, dtype=torch.float64), torch.randn(11, 2, 8, dtype=torch.float64)  # 2 KV heads
    got = varlen.attention(q, k, v, torch.tensor(cu, dtype=torch.int32), 6, scale=0.3)
    rep = lambda t: t.repeat_interleave(3, dim=1).transpose(0, 1)  # (H, T, D)
    mask = _block_causal_mask(cu, 11)
    want = F.scaled_dot_product_attention(q.transpose(0, 1), rep(k), rep(v), attn_mask=mask, scale=0.3).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_plan_rows_lays_the_rows_side_by_side():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 8, 9], [5, 4, 0, 0]])
    plan = speed.plan_rows(ids, [3, 4, 2])
    assert plan.mask is None
    assert plan.input_ids.tolist() == [[5, 6, 7, 5, 6, 8, 9, 5, 4]]
    assert plan.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert plan.index.tolist() == [[0, 1, 2, 0], [3, 4, 5, 6], [7, 8, 0, 0]]


def test_packed_batches_through_segments_equal_the_padded_call(tiny_model_dir, monkeypatch):
    """Where the segment kernel is usable (forced here), a batch runs as one sequence of segments:
    the states and LoRA gradients are the padded call's, and the `sdpa` entry is restored."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    body, batch, keep, params, plain, weights, plain_grads = padded_reference(tiny_model_dir)

    monkeypatch.setattr(varlen, "usable", lambda b, device: True)
    segments = []
    real = varlen.attention
    monkeypatch.setattr(varlen, "attention", lambda *a: segments.append(a[3].tolist()) or real(*a))
    entry = ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"]
    packed = speed.trained_hidden_states(body, batch["input_ids"], batch["attention_mask"], keep)
    packed_grads = torch.autograd.grad((packed * weights).sum(), params)

    assert body._lora_studio_varlen_ok is True
    assert segments[-1] == [0, 18, 37, 51, 67]  # the rows' used lengths 18, 19, 14, 16, side by side
    assert ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] is entry
    assert torch.allclose(packed, plain, rtol=1e-9, atol=1e-10)
    for got, want in zip(packed_grads, plain_grads):
        assert (got - want).abs().max() <= 1e-7 * want.abs().max()


def test_samples_packed_in_rows_through_segments_equal_the_mask_path(tiny_llama_dir, monkeypatch):
    model = _lora_model(tiny_llama_dir)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    samples = [Example(torch.randint(3, 300, (n,), generator=gen).tolist(), torch.randint(3, 300, (n,), generator=gen).tolist())
               for n in (5, 7, 3, 6, 4)]
    batch = collate(pack_examples(samples, 12), 0)
    ids, positions = batch["input_ids"], batch["position_ids"]
    assert ids.shape[0] > 1  # several rows, each with several samples and padding
    masked = speed.packed_rows_hidden(model.base_model, ids, positions)
    monkeypatch.setattr(varlen, "usable", lambda b, device: True)
    calls = []
    real = varlen.forward
    monkeypatch.setattr(varlen, "forward", lambda *a: calls.append(a) or real(*a))
    segmented = speed.packed_rows_hidden(model.base_model, ids, positions)
    assert calls and calls[0][1].shape == (1, ids.numel())
    real_tokens = batch["attention_mask"].bool()
    assert torch.allclose(segmented[real_tokens], masked[real_tokens], rtol=1e-9, atol=1e-10)


def test_segments_are_used_only_on_a_gpu_with_half_products(tiny_llama_dir):
    body = _lora_model(tiny_llama_dir).base_model
    assert varlen.usable(body, torch.device("cpu")) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_segment_kernel_computes_the_segment_equation():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("flash attention needs an Ampere or newer GPU")
    torch.manual_seed(0)
    cu = torch.tensor([0, 40, 41, 130], dtype=torch.int32)
    q = torch.randn(130, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(130, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    got = varlen.attention(q, k, v, cu.cuda(), 89, scale=0.125).float()
    want = varlen.attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), cu, 89, scale=0.125)
    assert (got.cpu().double() - want).abs().max() < 2e-2 * want.abs().max()
