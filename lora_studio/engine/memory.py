"""Memory estimate before training: what a run will need, by part, from the model's config alone.

    peak ≈ weights + adapter · (1 param + 1 grad + 2 AdamW moments) + activations + logits
           + workspace + runtime

* weights: every base parameter at its dtype's size (fp32 4 B, bf16 2 B); with `quantize=4bit`
  the block linears take 4.13 bits (NF4 + double-quantized block constants), the rest bf16.
* adapter: trainable parameters counted exactly, by injecting the method into the model built
  on the `meta` device (no weights are read). Kept in fp32.
* activations: the tensors autograd saves for backward at the largest micro-batch
  (batch_size / (grad_accum_steps · GPUs) sequences of the longest length). Per token and
  block, for a LLaMA-style block (RMSNorm, SDPA attention, gated MLP) with hidden h, key/value
  width kv, heads n, MLP width i:  6h + 2kv + n + 4i + 2 elements, plus r per adapted linear;
  for a GPT-2-style block (LayerNorm, plain MLP):  8h + n + 5i + 4 (+2h with residual dropout,
  + 3·n·T instead of n when attention runs on the unfused path: CPU with attention dropout).
  The layer inputs that only the adapter keeps (2h + i) are dropped for LoRA-FA; VeRA adds
  r + d_out and DoRA 2·d_out per adapted linear; adapter dropout adds d_in (+1 byte mask).
  With gradient checkpointing: h per block, plus one block recomputed during its backward.
* logits: the LM head runs on trained positions only, in chunks (speed.linear_cross_entropy):
  one chunk's fp32 logits at a time (half again under autocast, whose bf16 logits are copied
  to fp32), and d loss / d hidden, N_trained · h · 4 B, kept for backward.
* workspace: what the backward and the allocator add on top of the saved tensors (gradients
  flowing through each block, freed intermediates the allocator keeps): on CPU 1.0 × the
  activations, and with gradient checkpointing 0.5 × the activations the step would keep
  without it (glibc retains freed block intermediates; both factors measured, see below);
  0.25 × on CUDA (not measured: no GPU was available when this was written).
* several processes (`world` > 1), per rank: with `strategy=ddp` every rank holds all of the
  weights, adapter, gradients and optimizer state, and a 1/world share of the batch. With
  `fsdp` (FSDP2) weights, adapter, gradients and optimizer state are divided by world, plus the
  whole weights of two blocks (the one running and the next, gathered ahead) and, at the root,
  the embeddings and LM head gathered for the forward: `gathered_mb`.
* runtime: Python, torch, transformers and tokenizers in a CPU process (400 MB); on a GPU the
  CUDA context (about 500 MB) is outside torch's counters and not part of `total_mb`.

`total_mb` is the number to put next to the measured peak: peak process RSS on CPU
(`peak_rss_mb` in the metrics), `cuda_peak_mb` (torch.cuda.max_memory_allocated) on a GPU.

Checked against measurements (scripts/memory_check.py prints the tables; docs/memory.md has
them; LoRA r=16 on every linear, fp32, CPU):
  saved activations, counted with autograd's saved-tensor hooks: within 2.5% on the tiny
  LLaMA and GPT-2 of the tests and 0.2% on SmolLM2-135M (tests/test_memory.py holds it to
  ±10%). Peak process RSS of real runs on SmolLM2-135M (bundled), batch 1 to 8, 50- and
  230-token rows: within ±6%; with gradient checkpointing or accumulation 5-12% low.
  Not measured on a GPU (none was available).
"""

from __future__ import annotations

import dataclasses
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_studio.config import TrainConfig
from lora_studio.engine.plan import Plan
from lora_studio.engine.speed import LOSS_CHUNK_BYTES
from lora_studio.methods import Method

MB = 2**20
CPU_RUNTIME_MB = 400.0
CUDA_CONTEXT_MB = 500.0
NF4_BYTES_PER_PARAM = 4.127 / 8
NON_GATED = {"gpt2", "gpt_neo", "gptj", "gpt_neox", "gpt_bigcode", "opt", "bloom", "falcon", "phi", "codegen", "starcoder2"}


@dataclass
class MemoryEstimate:
    """An estimate in MiB, by part. `total_mb` compares with the measured peak (see module doc)."""

    device: str
    weights_mb: float
    adapter_mb: float
    gradients_mb: float
    optimizer_mb: float
    activations_mb: float
    logits_mb: float
    workspace_mb: float
    runtime_mb: float
    trainable_params: int
    total_params: int
    micro_batch: int
    seq_len: int
    notes: list[str] = field(default_factory=list)
    strategy: str = "single"
    """`single` (one process), `ddp` or `fsdp`: the numbers are per rank."""
    world: int = 1
    gathered_mb: float = 0.0
    """FSDP only: the whole weights gathered for the block running (and the next), per rank."""

    @property
    def total_mb(self) -> float:
        parts = (
            self.gathered_mb + self.weights_mb + self.adapter_mb + self.gradients_mb + self.optimizer_mb
            + self.activations_mb + self.logits_mb + self.workspace_mb
        )
        return parts + (self.runtime_mb if self.device == "cpu" else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_mb": self.total_mb}

    def summary(self) -> str:
        where = "peak RSS" if self.device == "cpu" else "peak CUDA memory"
        return (
            f"~{self.total_mb / 1024:.2f} GiB {where}: weights {self.weights_mb:.0f} MiB, adapter+grads+optimizer "
            f"{self.adapter_mb + self.gradients_mb + self.optimizer_mb:.0f} MiB, activations "
            f"{self.activations_mb + self.logits_mb + self.workspace_mb:.0f} MiB"
            + (f", gathered blocks {self.gathered_mb:.0f} MiB" if self.strategy == "fsdp" else "")
            + (f", runtime {self.runtime_mb:.0f} MiB" if self.device == "cpu" else "")
            + (f" — per rank of {self.world} ({self.strategy.upper()})" if self.world > 1 else "")
        )


@dataclass
class Arch:
    """The few numbers of a decoder that the activation formula needs."""

    hidden: int
    layers: int
    heads: int
    kv_dim: int
    intermediate: int
    vocab: int
    gated: bool
    gelu_tanh: bool
    attn_dropout: float
    resid_dropout: float
    attn_impl: str

    @classmethod
    def from_config(cls, config: Any) -> "Arch":
        c = config.get_text_config() if hasattr(config, "get_text_config") else config

        def first(*names: str, default: Any = None) -> Any:
            for n in names:
                v = getattr(c, n, None)
                if v is not None:
                    return v
            return default

        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head")
        head_dim = first("head_dim", default=hidden // heads)
        kv_heads = first("num_key_value_heads", default=heads)
        return cls(
            hidden=hidden,
            layers=first("num_hidden_layers", "n_layer"),
            heads=heads,
            kv_dim=kv_heads * head_dim,
            intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            vocab=c.vocab_size,
            gated=getattr(c, "model_type", "") not in NON_GATED,
            gelu_tanh=first("activation_function", "hidden_act", default="") in ("gelu_new", "gelu_fast"),
            attn_dropout=float(first("attn_pdrop", "attention_dropout", default=0.0) or 0.0),
            resid_dropout=float(first("resid_pdrop", "hidden_dropout", default=0.0) or 0.0),
            attn_impl=str(getattr(c, "_attn_implementation", None) or "sdpa"),
        )


@dataclass
class AdaptedLinear:
    name: str
    d_in: int
    d_out: int


def _input_group(name: str, d_in: int, arch: Arch) -> str:
    """Which saved input an adapted linear shares: attention in/out, MLP in, MLP middle."""
    last = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if d_in == arch.intermediate and d_in != arch.hidden:
        return "mlp_mid"
    if last in ("o_proj", "out_proj", "dense") or (last == "c_proj" and "attn" in parent):
        return "attn_out"
    if last in ("gate_proj", "up_proj", "fc1", "c_fc", "w1", "w3", "dense_h_to_4h", "gate_up_proj"):
        return "mlp_in"
    if last == "c_proj" or last in ("down_proj", "fc2", "w2", "dense_4h_to_h"):
        return "mlp_mid"
    return "attn_in"


def activation_elements_per_token(
    arch: Arch, layer_linears: list[AdaptedLinear], method: Method, rank: int, dropout: float, seq_len: int, device: str
) -> float:
    """Elements autograd saves per token for one block (see the module docstring)."""
    h, kv, n, i = arch.hidden, arch.kv_dim, arch.heads, arch.intermediate
    math_attention = arch.attn_impl == "eager" or (device == "cpu" and arch.attn_dropout > 0)
    attn_softmax = n * seq_len * (1 + 2 * (arch.attn_dropout > 0)) if math_attention else n
    if arch.gated:
        # 2 RMSNorms (input + rsqrt), q and k/v for attention, attention output,
        # MLP: gate, up, act(gate) and the product (the down input, counted as an adapter input).
        base = 2 * (h + 1) + h + 2 * kv + h + attn_softmax + 3 * i
    else:
        # 2 LayerNorms (input, mean, rstd), q, k, v, attention output, MLP hidden (+tanh-GELU parts).
        base = 2 * (h + 2) + 4 * h + attn_softmax + (4 * i if arch.gelu_tanh else 1 * i)
        if arch.resid_dropout > 0:
            base += 2 * h
    sizes = {"attn_in": h, "attn_out": 0, "mlp_in": h, "mlp_mid": i}
    groups = {_input_group(lin.name, lin.d_in, arch) for lin in layer_linears}
    keeps_input = method.keeps_layer_input
    adapter = sum(sizes[g] for g in groups) if keeps_input else 0
    for lin in layer_linears:
        adapter += method.saved_per_linear(rank, lin.d_out)
        if dropout > 0 and keeps_input:
            adapter += lin.d_in * 1.25  # the dropped copy (fp32) and its bool mask
    return base + adapter


def _build_meta(plan: Plan) -> nn.Module:
    """The model with its adapter, on the meta device: shapes and counts, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_studio.methods import inject_adapters
    from lora_studio.models import resolve_model_path

    cfg = plan.cfg
    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model), trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        inject_adapters(model, plan.method, cfg)
    return model


def _adapted_linears(model: nn.Module) -> list[AdaptedLinear]:
    from lora_studio.methods import adapter_layers

    return [AdaptedLinear(name, layer.in_features, layer.out_features) for name, layer in adapter_layers(model).items()]


def _first_block(linears: list[AdaptedLinear], layers: int) -> list[AdaptedLinear]:
    """The adapted linears of one block (the one with the most), for the per-block formula."""
    by_block: dict[str, list[AdaptedLinear]] = {}
    for lin in linears:
        parts = lin.name.split(".")
        idx = next((k for k, p in enumerate(parts) if p.isdigit()), None)
        key = ".".join(parts[: idx + 1]) if idx is not None else ""
        by_block.setdefault(key, []).append(lin)
    return max(by_block.values(), key=len) if by_block else []


def _weight_bytes(model: nn.Module, cfg: TrainConfig, base_dtype: torch.dtype, linears: list[AdaptedLinear]) -> float:
    """Bytes of the frozen base: measured on a real model, computed on a meta one."""
    from lora_studio.methods import trainable_parameters

    trainable = {id(p) for p in trainable_parameters(model).values()}
    frozen = [p for p in model.parameters() if id(p) not in trainable]
    if frozen and not frozen[0].is_meta:
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in frozen}
        return float(sum(storages.values()))
    size = torch.finfo(base_dtype).bits // 8
    numel = sum(p.numel() for p in frozen)
    if cfg.quantize != "4bit":
        return float(numel * size)
    quantized = sum(lin.d_in * lin.d_out for lin in linears)  # bitsandbytes takes the block linears
    return (numel - quantized) * size + quantized * NF4_BYTES_PER_PARAM


def estimate(
    plan: Plan,
    *,
    seq_len: int | None = None,
    trained_tokens: int | None = None,
    model: nn.Module | None = None,
    strategy: str | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of training `plan` (see the module docstring for the parts).

    `seq_len` is the padded length of the largest batch (default `max_seq_len`, the worst
    case); `trained_tokens` the positions with a loss in that micro-batch (default: half of
    them). `model` is an already built model with its adapter (else one is built on `meta`).
    `strategy` (default `plan.strategy`; `single` counts as ddp) splits the parts per rank when
    `plan.world` > 1 (see the module docstring).
    """
    from lora_studio.methods import count_parameters

    cfg, device_t = plan.cfg, plan.device
    built = model if model is not None else _build_meta(plan)
    arch = Arch.from_config(built.config)
    linears = _adapted_linears(built)
    trainable, total = count_parameters(built)
    autocast, base_dtype = plan.autocast_dtype, plan.base_dtype
    seq = min(seq_len or cfg.max_seq_len, cfg.max_seq_len)
    micro = plan.micro_batch
    tokens = micro * seq
    trained = trained_tokens if trained_tokens is not None else tokens // 2
    elem = 2 if autocast is not None else 4
    per_block = activation_elements_per_token(
        arch, _first_block(linears, arch.layers), plan.method, cfg.rank, cfg.dropout, seq, device_t.type
    )
    notes = []
    if cfg.gradient_checkpointing:
        saved = arch.layers * arch.hidden + per_block  # block inputs + one block recomputed
    else:
        saved = arch.layers * per_block
    saved += arch.hidden + 2  # the final norm
    activations = tokens * saved * elem + (micro * seq * seq if micro > 1 else 0)  # + the padding mask (bool)
    chunk = min(trained, max(16, LOSS_CHUNK_BYTES // (4 * arch.vocab)))
    logits = chunk * arch.vocab * (6 if autocast is not None else 4) + trained * arch.hidden * 4
    if trained_tokens is None:
        notes.append("assumed half of the tokens are trained (response-only masking)")
    if not arch.gated and arch.hidden is None:  # pragma: no cover - unknown layout
        notes.append("unknown architecture: activation formula of a LLaMA-style block")
    adapter = trainable * 4
    if device_t.type != "cpu":
        workspace = 0.25 * activations
    elif cfg.gradient_checkpointing:
        # glibc keeps much of what each block's forward allocated and freed: measured, about
        # half of what the same step would keep without checkpointing.
        workspace = 0.5 * tokens * arch.layers * per_block * elem
    else:
        workspace = activations
    weights = _weight_bytes(built, cfg, base_dtype, linears)
    world = plan.world
    strategy = "single" if world <= 1 else ("fsdp" if (strategy or plan.strategy) == "fsdp" else "ddp")
    shard, gathered = 1.0, 0.0
    if strategy == "fsdp":
        shard = 1.0 / world
        per_block = (weights - _root_bytes(built)) / max(1, arch.layers)
        gathered = (2 * per_block + _root_bytes(built)) * (1 - shard)  # this rank's share is counted already
        notes.append(f"per rank of {world}: weights, adapter, gradients and optimizer state sharded 1/{world}")
    elif strategy == "ddp":
        notes.append(f"per rank of {world}: each rank holds the whole model, adapter and optimizer state")
    return MemoryEstimate(
        device=device_t.type,
        weights_mb=weights * shard / MB,
        adapter_mb=adapter * shard / MB,
        gradients_mb=adapter * shard / MB,
        optimizer_mb=2 * adapter * shard / MB,
        activations_mb=activations / MB,
        logits_mb=logits / MB,
        workspace_mb=workspace / MB,
        runtime_mb=CPU_RUNTIME_MB if device_t.type == "cpu" else CUDA_CONTEXT_MB,
        trainable_params=trainable,
        total_params=total,
        micro_batch=micro,
        seq_len=seq,
        notes=notes,
        strategy=strategy,
        world=max(1, world),
        gathered_mb=gathered / MB,
    )


def _root_bytes(model: nn.Module) -> float:
    """Bytes of the frozen weights outside the decoder blocks (embeddings, final norm, LM head)."""
    from lora_studio.engine.fsdp import decoder_layers

    inside = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    return float(sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inside and not p.requires_grad))


def pick_strategy(plan: Plan, capacity_mb: float | None = None) -> str:
    """`cfg.strategy` with `auto` decided: ddp when the DDP estimate per rank fits one device's
    memory (`capacity_mb`; default: the GPU's, or on a CPU the free RAM shared by the ranks),
    else fsdp where the run can shard. One process: `single`. (make_plan calls it.)"""
    cfg, world, device = plan.cfg, plan.world, plan.device
    if world <= 1:
        return "single"
    if cfg.strategy != "auto":
        return cfg.strategy
    from lora_studio.engine.fsdp import fsdp_refusal

    if fsdp_refusal(plan.method, cfg) is not None:
        return "ddp"
    if capacity_mb is None:
        if device.type == "cuda":
            capacity_mb = torch.cuda.get_device_properties(device).total_memory / MB
        else:
            import psutil

            capacity_mb = psutil.virtual_memory().available / MB / world
    try:
        need = estimate(plan, strategy="ddp").total_mb
    except Exception:  # noqa: BLE001 - no estimate for this model: DDP, the choice that needs no sharding rules
        return "ddp"
    return "ddp" if need <= capacity_mb else "fsdp"


def estimate_for_examples(plan: Plan, model: nn.Module | None, examples: list[Any]) -> MemoryEstimate:
    """The estimate for the largest micro-batch of this data (the loop groups by length)."""
    longest = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)[: plan.micro_batch]
    seq = len(longest[0].input_ids) if longest else plan.cfg.max_seq_len
    trained = sum(sum(1 for t in e.labels[1:] if t != -100) for e in longest)
    return estimate(plan, seq_len=seq, trained_tokens=trained, model=model)


# ---------------------------------------------------------------- measured during a run


def peak_rss_mb() -> float:
    """This process's peak RSS since it started (MiB).

    Linux's VmHWM, not getrusage's ru_maxrss: ru_maxrss survives exec, so a worker spawned by
    a large app process would report the app's size as its own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Process RSS now and at peak (MiB); CUDA allocated/reserved/peak where there is a GPU."""
    import psutil

    stats = {"rss_mb": psutil.Process().memory_info().rss / 2**20, "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        stats.update(
            cuda_allocated_mb=torch.cuda.memory_allocated(device) / 2**20,
            cuda_reserved_mb=torch.cuda.memory_reserved(device) / 2**20,
            cuda_peak_mb=torch.cuda.max_memory_allocated(device) / 2**20,
        )
    return stats
