"""The engine's speed and memory choices, kept out of the training loop so it stays readable.

* Precision. On hardware with native bf16 matrix units (CUDA GPUs of the Ampere generation and
  later; x86 CPUs with AVX512-BF16 or AMX) the forward runs under bf16 autocast: matrix products
  in bf16, norms, softmax and the residual stream in fp32, the adapter's own weights (the "master
  weights") and their optimizer state in fp32. The frozen weights of the linear layers are then
  *stored* in bf16: autocast would round them to bf16 before every product anyway, so the stored
  copy gives bit-identical products without a per-step cast or an fp32 copy in memory. The
  embedding table is never cast (its rows feed the fp32 residual stream as they are), nor is a
  weight a method writes (Delta-LoRA), nor the base when a merged model is asked for.
* The loss. `linear_cross_entropy` runs the LM head and the cross-entropy over chunks of the
  trained positions and keeps only d loss / d hidden (N × H), never all logits (N × V) in fp32.
* Gradient checkpointing only when the activations would not fit (`"auto"`).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lora_studio.methods import adapter_layers
from lora_studio.methods.base import is_linear

PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINTING = ("auto", "on", "off")

LOSS_CHUNK_BYTES = 64 * 2**20
"""fp32 logits held at once by `linear_cross_entropy` (64 MiB: 341 positions of a 49k vocabulary)."""


# ---------------------------------------------------------------- precision


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16); oneDNN then
    runs bf16 products several times faster than fp32 ones. Elsewhere bf16 would be emulated."""
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


def device_has_native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(precision: str, device: torch.device, quantize: str | None = None) -> str:
    """`auto` -> `bf16` where the device has native bf16 (and the base is not 4-bit, whose
    kernels pick their own compute dtype), else `fp32`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if precision != "auto":
        return precision
    return "bf16" if device_has_native_bf16(device) and quantize is None else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context every training forward runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def store_frozen_linears(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen fp32 weights of linear layers in `dtype`; returns how many tensors.

    Linear layers are: the base layer inside each adapter layer, and every plain linear outside
    the adapters (untargeted projections, an untied LM head). Skipped: anything trainable, the
    adapters' own tensors, 4-bit weights, and a weight tied to the input embedding.
    """
    layers = adapter_layers(model)
    inside = {id(m) for layer in layers.values() for m in layer.modules()}
    modules = [layer.base for layer in layers.values()]
    modules += [m for m in model.modules() if is_linear(m) and id(m) not in inside]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(embeddings.weight)} if embeddings is not None else set()
    count = 0
    for module in modules:
        cast = False
        for p in module.parameters(recurse=False):
            if p.requires_grad or p.dtype != torch.float32 or id(p) in tied:
                continue
            p.data = p.data.to(dtype)
            count += 1
            cast = True
        if cast and not getattr(module, "_lora_studio_guarded", False):
            module.register_forward_pre_hook(_cast_input)
            module.register_forward_hook(_restore_output)
            module._lora_studio_guarded = True
    return count


def apply_precision(model: nn.Module, precision: str, cfg: Any, method: Any) -> dict[str, Any]:
    """Prepare an adapted model for `precision` (already resolved); returns what was done."""
    done: dict[str, Any] = {"precision": precision, "bf16_weights": 0}
    writes_base = not getattr(method, "supports_4bit", True)  # Delta-LoRA adds to W0 every step
    if precision == "bf16" and not writes_base and not cfg.merge and cfg.quantize is None:
        done["bf16_weights"] = store_frozen_linears(model, torch.bfloat16)
    return done


# ---------------------------------------------------------------- gradient checkpointing


def activation_bytes(model: nn.Module, tokens: int, precision: str) -> int:
    """Rough size of what autograd keeps for one batch of `tokens` tokens: about
    10·hidden + 4·intermediate values per token and layer (measured on Llama-type blocks)."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    per_value = 2 if precision == "bf16" else 4
    return int(tokens * layers * (10 * hidden + 4 * inner) * per_value)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def wants_checkpointing(setting: str, model: nn.Module, tokens: int, precision: str, device: torch.device) -> bool:
    """`on`/`off` as asked; `auto`: on only when the activations of the largest batch would take
    more than half of the free memory (recomputing costs about a third more compute)."""
    if setting not in CHECKPOINTING:
        raise ValueError(f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)} (got {setting!r})")
    if setting != "auto":
        return setting == "on"
    return activation_bytes(model, tokens, precision) > available_bytes(device) // 2


def enable_checkpointing(model: nn.Module) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    try:
        enable({"use_reentrant": False})
    except ValueError as e:  # the architecture has no checkpointing support
        raise ValueError(f"gradient_checkpointing: {e}") from None


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

    A frozen nn.Linear head takes the chunked path above; a trainable or unusual head (a
    4-bit or Conv1D head, logit post-processing) gets the plain computation.
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
