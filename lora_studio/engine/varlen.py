"""Variable-length attention for packed sequences on a GPU: no dense mask, no padding.

A packed sequence holds several rows one after the other; row i runs from `cu_seqlens[i]` to
`cu_seqlens[i + 1]` and attends causally within itself only. On CUDA, PyTorch's flash kernel for
variable-length batches (`torch.nn.attention.varlen.varlen_attn`) does that in O(L) memory,
where the CPU path (`speed.plan_packing`) gives the model a dense L × L mask (and, on top,
shares the rows' common prefixes, which a segment kernel cannot express). Transformers passes
the keyword arguments of a model's forward down to its attention function, so the segment
boundaries travel as `cu_seq_lens_q` / `max_length_q` (the names its flash-attention
integration uses) and `swapped()` puts `sdpa_or_varlen` in place of the `sdpa` entry for the
duration of a forward. Off CUDA (tests), `attention` computes the same equation with causal
SDPA per segment.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

_ORIGINAL: dict[str, Any] = {}


def usable(body: nn.Module, device: torch.device) -> bool:
    """Whether a packed forward of `body` can run the CUDA segment kernel: flash attention needs
    an Ampere or newer GPU and bf16/fp16 products (autocast or half weights), and the model must
    use transformers' `sdpa` attention (the entry swapped here)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    half = torch.is_autocast_enabled("cuda") or any(
        p.dtype in (torch.bfloat16, torch.float16) for p in body.parameters())
    return half and getattr(getattr(body, "config", None), "_attn_implementation", None) == "sdpa"


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Segment starts of a packed sequence (1, L) whose positions restart at 0 for each row:
    (cu_seqlens (S + 1,) int32, longest segment)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)  # (S,)
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
              max_length: int, scale: float | None) -> torch.Tensor:
    """Causal attention within each segment: q (T, H, D), k and v (T, KV, D) -> (T, H, D)."""
    gqa = key.shape[1] != query.shape[1]
    if query.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        dtype = query.dtype
        low = dtype if dtype in (torch.bfloat16, torch.float16) else torch.get_autocast_dtype("cuda")
        q, k, v = (t.to(low).contiguous() for t in (query, key, value))  # (T, heads, D) rows, as flash wants
        out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, scale=scale,
                          window_size=(-1, 0), enable_gqa=gqa)  # (-1, 0): causal
        return out.to(dtype)
    bounds = cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))  # (H, n, D)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(out.transpose(0, 1))  # (n, H, D)
    return torch.cat(outs)


def sdpa_or_varlen(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Transformers' attention signature: (1, H, T, D) inputs -> ((1, T, H, D), None). With
    segment boundaries in the keyword arguments, the segment kernel (the mask is not read);
    without, the function it replaced."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return _ORIGINAL["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    if kwargs.get("dropout"):  # the callers pack this way only without dropout (speed._drops_out)
        raise ValueError("the variable-length attention path has no attention dropout")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    out = attention(q, k, v, cu, int(kwargs["max_length_q"]), kwargs.get("scaling"))
    return out[None], None


@contextlib.contextmanager
def sdpa_entry(replacement: Any, originals: dict[str, Any]) -> Iterator[None]:
    """`replacement` in place of transformers' `sdpa` attention for the duration of a forward (the
    backward reuses the graph); `originals["sdpa"]` keeps what it replaced, for its fallback."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    original = mapping["sdpa"]
    if original is not replacement:  # (nested: already swapped)
        originals["sdpa"] = original
    mapping["sdpa"] = replacement
    try:
        yield
    finally:
        mapping["sdpa"] = original


def swapped() -> contextlib.AbstractContextManager:
    """`sdpa_or_varlen` in place of transformers' `sdpa` attention for the duration of a forward."""
    return sdpa_entry(sdpa_or_varlen, _ORIGINAL)


def forward(body: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder body on one packed sequence (1, L) whose positions restart at 0 at each row,
    through the segment kernel: last hidden states (L, H)."""
    cu, longest = cu_seqlens_from_positions(position_ids)
    with swapped():
        out = body(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                   cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return out.last_hidden_state[0]
