"""The engine's speed and memory choices, kept out of the training loop so it stays readable.

* Packing. A right-padded batch runs as one sequence holding each distinct row prefix once
  (`PackPlan`): no padding, the chat template's shared system prompt and headers computed once
  per batch instead of once per row, and nothing past a row's last trained position. Exact:
  the same products and gradients as the padded batch.
* The loss. `linear_cross_entropy` runs the LM head on the trained positions only, over chunks,
  and keeps only d loss / d hidden (N × H): never all logits (N × V) in fp32.
* Precision on a CPU. bf16 autocast only where bf16 products measure faster than fp32 ones
  (`bf16_pays`: AMX, AMD Zen 4; an Intel core with AVX512-BF16 but no AMX is slower in bf16).
  Then the frozen linear weights are *stored* in bf16 (`store_frozen_linears`): autocast would
  round them to bf16 before every product anyway, so the products are bit-identical, without a
  per-step cast or an fp32 copy in memory; the embedding table, norms and the adapter's own
  (master) weights stay fp32.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lora_studio.engine import varlen
from lora_studio.methods import adapter_layers
from lora_studio.methods.base import is_linear
from lora_studio.methods.lowrank import give_spare_columns

LOSS_CHUNK_BYTES = 64 * 2**20
"""fp32 logits held at once by `linear_cross_entropy` (64 MiB: 341 positions of a 49k vocabulary)."""


# ---------------------------------------------------------------- precision


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 multiply instructions (AVX512-BF16 or AMX-BF16); elsewhere
    bf16 would be emulated. Whether they beat fp32 is `cpu_bf16_speedup`'s question."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, stay in fp32
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of one mid-sized matrix product on one core (best of 5, CPU time, so
    other processes barely move it). Native bf16 does not mean fast bf16: AMX or AMD's Zen 4
    double the rate or better, while an Intel core with AVX512-BF16 but no AMX runs oneDNN's
    bf16 kernel at about half its fp32 rate."""
    a = torch.randn(256, 1024)
    b = torch.randn(1024, 1024)
    best = {}
    with threads(1):
        for dtype in (torch.float32, torch.bfloat16):
            x, w = a.to(dtype), b.to(dtype)
            F.linear(x, w)  # warm-up: kernel selection and JIT
            times = []
            for _ in range(5):
                start = time.process_time()
                F.linear(x, w)
                times.append(time.process_time() - start)
            best[dtype] = max(min(times), 1e-6)
    return best[torch.float32] / best[torch.bfloat16]


def bf16_pays(device: torch.device) -> bool:
    """Does training in bf16 beat fp32 here? On CUDA: native bf16 support (Ampere and later).
    On CPU: native bf16 instructions and a measured speed-up of at least 1.3× on products."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16() and cpu_bf16_speedup() >= 1.3
    return False


def _cast_input(module: nn.Module, args: tuple) -> tuple | None:
    # Outside autocast (an eval pass someone adds later, generation) a bf16 weight would meet an
    # fp32 input and fail: cast the input here and the output back in `_restore_output`.
    x = args[0]
    if torch.is_autocast_enabled(x.device.type) or x.dtype == module.weight.dtype:
        return None
    module._input_dtype = x.dtype
    return (x.to(module.weight.dtype), *args[1:])


def _restore_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    dtype = module.__dict__.pop("_input_dtype", None)
    return out.to(dtype) if dtype is not None else None


def _guard(module: nn.Module) -> None:
    """Once per module: the hooks that let a bf16-stored weight take an fp32 input outside autocast."""
    if not getattr(module, "_lora_studio_guarded", False):
        module.register_forward_pre_hook(_cast_input)
        module.register_forward_hook(_restore_output)
        module._lora_studio_guarded = True


def store_frozen_linears(model: nn.Module, dtype: torch.dtype = torch.bfloat16, spare: bool = True) -> int:
    """Store the frozen fp32 weights of linear layers in `dtype`; returns how many tensors.

    Linear layers are: the base layer inside each adapter layer, and every plain linear outside
    the adapters (untargeted projections, an untied LM head). Skipped: anything trainable, the
    adapters' own tensors and 4-bit weights. A head tied to the input embedding is stored in
    `dtype` with its table (`_store_tied_table`). With `spare`, the base weight of a LoRA layer
    gets r spare columns a row for its adapter (`lora.give_spare_columns`; one process only:
    DDP and FSDP move whole, contiguous parameters).
    """
    layers = adapter_layers(model)
    inside = {id(m) for layer in layers.values() for m in layer.modules()}
    modules = [(layer.base, getattr(layer, "spare_columns", 0) if spare else 0) for layer in layers.values()]
    modules += [(m, 0) for m in model.modules() if is_linear(m) and id(m) not in inside]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    count = _store_tied_table(model, embeddings, dtype)  # (a tied head's weight is then bf16: skipped below)
    for module, columns in modules:
        cast = False
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad or p.dtype != torch.float32:
                continue
            if columns and name == "weight" and isinstance(module, nn.Linear):
                give_spare_columns(p, columns, dtype)
            else:
                p.data = p.data.to(dtype)
            count += 1
            cast = True
        if cast:
            _guard(module)
    return count


def _embedding_to_fp32(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.float()  # the residual stream stays fp32, as under plain autocast


def _store_tied_table(model: nn.Module, embeddings: nn.Module | None, dtype: torch.dtype) -> int:
    """A frozen embedding table that is also the LM head (tied) is stored in `dtype` too; returns 1
    if it was.

    Under autocast the head rounds the whole table (V × H, 28 M numbers on the bundled model) to
    bf16 for every chunk of the loss, forward and backward: ~50 ms of casting in a 0.9 s step,
    and an fp32 table is 4 bytes a number where the products read 2. Stored once in bf16, the
    head's products are unchanged, and the lookup returns the bf16-rounded rows as fp32 (hook
    below): the one difference from plain autocast is that rounding of the input embeddings
    (relative 2⁻⁹, the size of one bf16 product's rounding).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None or head is None or getattr(head, "weight", None) is not weight:
        return 0
    if weight.requires_grad or weight.dtype != torch.float32:
        return 0
    weight.data = weight.data.to(dtype)
    _guard(head)  # a call outside autocast (generation)
    if not getattr(embeddings, "_lora_studio_upcast", False):
        embeddings.register_forward_hook(_embedding_to_fp32)
        embeddings._lora_studio_upcast = True
    return 1


# ---------------------------------------------------------------- packing rows as a prefix tree


@dataclass
class PackPlan:
    """A batch laid out as one sequence in which every distinct row prefix appears once.

    In a causal model the state at position t of a row depends only on its tokens 0..t, so rows
    that start alike (a chat template's system prompt and headers, a repeated instruction) have
    the same states there: the rows form a prefix tree (trie), and each node is computed once.
    Node j sits at position `position_ids[j]` (its depth) and attends to its ancestors and
    itself (`mask`), which are exactly the tokens it would see in its own row; the products and
    gradients are those of the padded batch (the rows' contributions to a shared node add up),
    without padding and without repeats. The sequence is rounded up to a multiple of
    `PACK_MULTIPLE` with filler nodes that attend only to themselves and that no row uses.
    """

    input_ids: torch.Tensor  # (1, L)
    position_ids: torch.Tensor  # (1, L)
    mask: torch.Tensor | None  # (1, 1, L, L) bool, True = may attend; None: rows as segments (varlen)
    index: torch.Tensor  # (B, T): node of (row, t); 0 past the row's used length
    lengths: list[int]  # positions used per row


# Every new packed length L makes oneDNN build (~1 ms each) and cache new kernels for each
# product shape, and almost every batch has a new L: over one epoch of the bench job that grew
# the process by ~400 MiB and cost time. Rounded up to a multiple of 8 (~2 % more positions,
# which cost nothing else: fillers see only themselves, and nothing reads them), the epoch
# sees a handful of lengths: peak RSS 1830 -> 1630 MiB on the bundled model in bf16.
PACK_MULTIPLE = 8


def plan_packing(input_ids: torch.Tensor, lengths: list[int], share: bool = True,
                 multiple: int = PACK_MULTIPLE) -> PackPlan:
    """The prefix tree of the rows' first `lengths[i]` tokens (`share=False`: rows side by side),
    with filler nodes up to a multiple of `multiple` positions."""
    batch, width = input_ids.shape
    rows = input_ids.tolist()
    nodes: dict[tuple, int] = {}  # (parent node, token) -> node
    tokens: list[int] = []
    depth: list[int] = []
    paths: list[list[int]] = []
    for row, n in enumerate(lengths):
        parent: Any = ("row", row) if not share else None
        path = []
        for t in range(n):
            key = (parent, rows[row][t])
            node = nodes.get(key)
            if node is None:
                node = nodes[key] = len(tokens)
                tokens.append(rows[row][t])
                depth.append(t)
            path.append(node)
            parent = node
        paths.append(path)
    used = len(tokens)
    fill = -used % multiple if used else 0
    tokens += [tokens[-1]] * fill if used else []  # any real token id; depth 0; seen by no row
    depth += [0] * fill
    size = len(tokens)
    device = input_ids.device
    mask = torch.zeros(size, size, dtype=torch.bool)
    fillers = torch.arange(used, size)
    mask[fillers, fillers] = True  # a filler attends to itself only (a row of no True would be NaN)
    index = torch.zeros(batch, width, dtype=torch.long)
    for row, path in enumerate(paths):
        if path:
            ids = torch.tensor(path)
            mask[ids[:, None], ids[None, :]] |= torch.ones(len(path), len(path), dtype=torch.bool).tril()
            index[row, : len(path)] = ids
    return PackPlan(
        torch.tensor(tokens, device=device)[None],
        torch.tensor(depth, device=device)[None],
        mask.to(device)[None, None],
        index.to(device),
        list(lengths),
    )


def plan_rows(input_ids: torch.Tensor, lengths: list[int]) -> PackPlan:
    """The rows' first `lengths[i]` tokens one after the other, no mask and no sharing: for the
    segment kernel (`varlen.py`), which reads the rows' bounds from the restarting positions."""
    batch, width = input_ids.shape
    device = input_ids.device
    used = torch.arange(width, device=device)[None] < torch.tensor(lengths, device=device)[:, None]  # (B, T)
    positions = torch.arange(width, device=device).expand(batch, width)
    index = torch.zeros(batch, width, dtype=torch.long, device=device)
    index[used] = torch.arange(int(used.sum()), device=device)
    return PackPlan(input_ids[used][None], positions[used][None], None, index, list(lengths))


def packing_pays(body: nn.Module, batch: int, width: int, packed: int) -> bool:
    """Packing trades the padded batch's B·T token-positions through the linear layers for the
    tree's L, at the price of one dense L × L attention instead of B blocks of T × T."""
    config = getattr(body, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not hidden or not layers:
        return False
    linear = sum(m.weight.numel() for m in body.modules() if is_linear(m)) / layers  # weights per layer
    padded_cost = batch * width * 2 * linear + batch * width**2 * 4 * hidden
    packed_cost = packed * 2 * linear + packed**2 * 4 * hidden
    return packed_cost < 0.9 * padded_cost


def _drops_out(body: nn.Module) -> bool:
    """True when a forward in this mode draws dropout masks (base model or adapter): rows would
    then get different masks on their common prefix, which one shared node cannot reproduce."""
    if not body.training:
        return False
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in body.modules()):
        return True
    config = getattr(body, "config", None)
    names = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout")
    return any(isinstance(getattr(config, n, None), float) and getattr(config, n) > 0 for n in names)


def _packed_forward(body: nn.Module, plan: PackPlan) -> torch.Tensor:
    if plan.mask is None:
        return varlen.forward(body, plan.input_ids, plan.position_ids)  # (L, H)
    out = body(input_ids=plan.input_ids, attention_mask=plan.mask, position_ids=plan.position_ids, use_cache=False)
    return out.last_hidden_state[0]  # (L, H)


def _probe_tolerance(body: nn.Module, device_type: str) -> float:
    """Largest relative difference between the packed and padded states that still means "same".
    The two layouts sum in different orders: ~1e-6 apart in fp32, ~1e-2 after 30 layers in bf16
    (measured 8e-3 on the bundled model); a layout the model gets wrong is ~1 apart (measured
    0.83 with the positions ignored), so either bound tells them apart."""
    low = {torch.bfloat16, torch.float16}
    if torch.is_autocast_enabled(device_type) or any(p.dtype in low for p in body.parameters()):
        return 5e-2
    return 1e-3


def _packing_works(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   segments: bool = False) -> bool:
    """Once per model and layout (prefix tree, or `segments` for the varlen kernel): does the
    packed layout give the padded call's states? (An architecture that ignores position_ids,
    derives a position bias from a 2D mask, or does not pass keyword arguments down to its
    attention would not.)"""
    attribute = "_lora_studio_varlen_ok" if segments else "_lora_studio_packing_ok"
    verdict = getattr(body, attribute, None)
    if verdict is None:
        was_training = body.training
        body.eval()
        try:
            with torch.no_grad():
                ids, mask = input_ids[:2], attention_mask[:2]
                layout = plan_rows if segments else plan_packing
                plan = layout(ids, mask.sum(1).tolist())
                packed = _packed_forward(body, plan)[plan.index]  # (2, T, H)
                plain = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (2, T, H)
                real = mask.bool()
                scale = plain[real].abs().max().clamp_min(1e-6)
                error = ((packed[real] - plain[real]).abs().max() / scale).item()
                verdict = error < _probe_tolerance(body, input_ids.device.type)
        except Exception:  # noqa: BLE001 - a probe: any failure means "use the padded call"
            verdict = False
        finally:
            body.train(was_training)
        setattr(body, attribute, verdict)
    return verdict


def trained_hidden_states(
    body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """The decoder body's last hidden states at the positions `keep` (B, T-1) marks, (N, H):
    what the LM head needs for a right-padded batch.

    Only positions up to each row's last kept one are computed (later ones, such as the EOS and
    newline a chat template ends a turn with, feed nothing that is trained), packed as a prefix
    tree (see PackPlan) when that is cheaper than the padded call. Falls back to the plain call
    for a batch of one, under gradient checkpointing, for rows longer than a sliding attention
    window, or on a model the packed layout does not reproduce. On a GPU that runs the
    variable-length attention kernel (`varlen.usable`), the rows go side by side as segments
    instead: no dense mask, no padding, no shared prefixes.
    """
    batch, width = input_ids.shape
    # A custom mask replaces the model's own, so a sliding window would not be applied: pack
    # only rows that fit in the window.
    window = getattr(getattr(body, "config", None), "sliding_window", None)
    fits = not isinstance(window, int) or width <= window
    if batch > 1 and fits and attention_mask.dim() == 2 and not getattr(body, "gradient_checkpointing", False):
        positions = torch.arange(keep.shape[1], device=keep.device)  # (T-1,)
        last = torch.where(keep, positions, -1).max(1).values  # (B,) last kept position per row
        lengths = torch.minimum(last + 1, attention_mask.sum(1)).tolist()
        drops = _drops_out(body)
        if not drops and varlen.usable(body, input_ids.device) and _packing_works(body, input_ids, attention_mask, True):
            plan = plan_rows(input_ids, lengths)
            return _packed_forward(body, plan)[plan.index[:, :-1][keep]]  # (N, H)
        plan = plan_packing(input_ids, lengths, share=not drops)
        size = plan.input_ids.shape[1]
        if size and packing_pays(body, batch, width, size) and _packing_works(body, input_ids, attention_mask):
            nodes = plan.index[:, :-1][keep]  # (N,)
            return _packed_forward(body, plan)[nodes]  # (N, H)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
    return hidden[:, :-1][keep]


def packed_rows_hidden(body: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states (B, T, H) of rows that each hold several samples one after the other
    (`packing: true`; positions restart at every sample). On a GPU with the segment kernel
    (`varlen.usable`) all rows run as one sequence of segments; else transformers builds its
    block-diagonal mask from the positions."""
    if varlen.usable(body, input_ids.device) and not _drops_out(body):
        batch, width = input_ids.shape
        hidden = varlen.forward(body, input_ids.reshape(1, -1), position_ids.reshape(1, -1))  # (B·T, H)
        return hidden.view(batch, width, -1)
    return body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


# ---------------------------------------------------------------- the loss


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i · Wᵀ + b, target_i), with W and b frozen.

    Forward goes over chunks of positions; for each it forms the logits, takes the loss, and
    right away d loss / d hidden = (softmax − onehot) · W. Only that (N × H) is kept for
    backward: no logits survive the chunk, and backward is a multiply by the incoming scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, wants_grad):  # type: ignore[override]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for a float64 check
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad = torch.empty_like(hidden) if wants_grad else None
        # Under autocast the products run in its dtype; outside it, in the weight's (a bf16-stored
        # head gets bf16 inputs), as an nn.Linear would.
        cast = None if torch.is_autocast_enabled(hidden.device.type) else weight.dtype
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]  # (n, H)
            t = targets[start : start + chunk]  # (n,)
            logits = F.linear(h if cast is None else h.to(cast), weight, bias).to(acc)  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' buffer
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0  # d CE / d logits
                grad[start : start + chunk] = (probs if cast is None else probs.to(cast)) @ weight  # (n, H)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` (N × V logits) against `targets` (N,).

    A frozen nn.Linear head takes the chunked path above; a trainable or 4-bit head gets the
    plain computation.
    """
    weight = getattr(head, "weight", None)
    plain = (
        not isinstance(head, nn.Linear)
        or weight is None
        or weight.requires_grad
        or (head.bias is not None and head.bias.requires_grad)
        or not weight.is_floating_point()
    )
    if plain:
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    chunk = chunk or max(16, LOSS_CHUNK_BYTES // (4 * weight.shape[0]))
    wants_grad = torch.is_grad_enabled() and hidden.requires_grad  # (forward runs with grad off)
    return _LinearCrossEntropy.apply(hidden, weight, head.bias, targets, chunk, wants_grad)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None: leave torch's choice)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_UPCAST_ORIGINAL: dict[str, Any] = {}


def _upcast_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    # One module-level function, not a closure made per forward: a compiled layer guards on the
    # attention function it traced, and a new function object every step would recompile it.
    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = _UPCAST_ORIGINAL["sdpa"](module, query.float(), key.float(), value.float(), attention_mask,
                                                *args, **kwargs)
    return out.to(dtype), weights


@contextlib.contextmanager
def fp32_attention_on_cpu() -> Iterator[None]:
    """Under CPU bf16 autocast, run transformers' `sdpa` attention in fp32.

    PyTorch's CPU attention kernel is ~3× slower in bf16 than in fp32 (fwd + bwd of a 9-head,
    176-token causal attention: 8.6 vs 2.8 ms on one core of an AVX512-BF16 Xeon), and attention
    has few FLOPs next to the linear layers, so fp32 costs nothing there and is the more exact of
    the two. Swaps the registry entry for the duration of a forward (the backward reuses the graph);
    anything else (GPU, fp32, an eager or flash attention) runs unchanged.
    """
    if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        yield
        return
    with varlen.sdpa_entry(_upcast_sdpa, _UPCAST_ORIGINAL):
        yield


# ---------------------------------------------------------------- compilation


def compile_regions(model: nn.Module, dynamic: bool | None = True) -> list[nn.Module]:
    """`torch.compile` each decoder layer in place (regional compilation); returns the layers.

    The layers are instances of one class with the same code: dynamo compiles the first one and
    reuses that code for every other layer (their parameters are inputs, not constants), so
    compilation costs one layer's worth (seconds) instead of the whole model's (minutes on a few
    CPU cores). `dynamic=True`: the sequence length is symbolic, so packed batches of every
    length share one graph instead of recompiling for each.
    """
    import os

    from lora_studio.engine.fsdp import decoder_layers
    from lora_studio.models import cache_dir

    # Inductor's on-disk caches (FX graphs, AOT autograd, kernels) next to the converted models:
    # a second run on the same model and settings starts warm (seconds instead of a minute here).
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    body = getattr(model, "base_model", model)
    spare = [layer for layer in adapter_layers(model).values() if hasattr(layer, "write_spare_columns")]
    if spare and getattr(body, "_lora_studio_writes_spare", None) is None:
        # LoRA's s·B goes into W0's spare columns here, in eager code before the compiled layers run:
        # written inside them, compiled code would copy each whole W0 back after every call.
        body._lora_studio_writes_spare = body.register_forward_pre_hook(functools.partial(_write_spare_columns, spare))
    layers = decoder_layers(body)
    for layer in layers:
        layer.compile(dynamic=dynamic)
    return layers


def uncompile_regions(model: nn.Module) -> None:
    """Undo `compile_regions`: the decoder layers run eagerly again (and write their own spare columns)."""
    import torch._dynamo

    from lora_studio.engine.fsdp import decoder_layers

    body = getattr(model, "base_model", model)
    for layer in decoder_layers(body):
        layer._compiled_call_impl = None
    handle = body.__dict__.pop("_lora_studio_writes_spare", None)
    if handle is not None:
        handle.remove()
    torch._dynamo.reset()


def _write_spare_columns(layers: list[nn.Module], module: nn.Module, args: tuple) -> None:
    for layer in layers:
        layer.write_spare_columns()


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (dynamo + inductor, forward and backward)."""
    from torch._dynamo.utils import compilation_time_metrics

    keys = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")
    return round(sum(sum(compilation_time_metrics.get(k, [])) for k in keys), 1)
