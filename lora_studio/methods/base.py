"""What every fine-tuning method shares: the adapter layer base class, injection into a
model, the `disable_adapter` context manager, merging, parameter counts, and the `Method`
record that the registry holds.

Methods hook in at one of three places (PEFT's split, plus one):
  * layer      - a wrapper replaces each targeted linear (LoRA, DoRA, VeRA);
  * optimizer  - same layers, different parameter groups or gradients (LoRA+, LoRA-FA, LoRA-Pro);
  * after-step - same layers, plus a rule run after each optimizer step (Delta-LoRA).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

try:  # GPT-2 stores its projections as Conv1D, weight (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]


def _linear4bit_type() -> tuple[type, ...]:
    # A model holding 4-bit layers has imported bitsandbytes already; importing it for
    # every other model would cost seconds and print warnings about missing kernels.
    bnb = sys.modules.get("bitsandbytes")
    return (bnb.nn.Linear4bit,) if bnb is not None else ()


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, fan_in_fan_out) of a linear-like layer."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_in, d_out, True
    return module.in_features, module.out_features, False


def is_4bit(weight: torch.Tensor) -> bool:
    """Whether `weight` is a bitsandbytes NF4 parameter (its data: packed codes, not numbers)."""
    return weight.__class__.__name__ == "Params4bit"


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as numbers: a 4-bit one dequantized (in the dtype it was quantized from), else itself."""
    if not is_4bit(weight):
        return weight
    import bitsandbytes.functional as bnbf

    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacked it for its bf16 CPU kernel (absmax rounded to bf16): the
        # NF4 codes can no longer be read back as they were. inject_adapters turns that off.
        raise RuntimeError("this 4-bit weight was repacked for bf16 CPU inference; reload the model")
    return bnbf.dequantize_4bit(weight.data, weight.quant_state)


def base_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as (d_out, d_in) in a float dtype, dequantized if stored in 4 bit."""
    weight = module.weight
    if is_4bit(weight):
        return dense_weight(weight)
    return weight.T if isinstance(module, Conv1D) else weight


class AdapterLayer(nn.Module):
    """Wraps a frozen base linear layer; subclasses add their adapter term in `adapt`.

    The wrapped layer stays at `self.base`, so the base model's own parameters keep their
    names (`...q_proj.base.weight`) and `disabled=True` gives the base output bit for bit.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base)
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled:
            return y
        return self.adapt(x, y)

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Base output y (..., d_out) plus this method's term for input x (..., d_in)."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """The weight (d_out, d_in) of one plain linear with the same forward."""
        raise NotImplementedError

    def merged_layer(self) -> nn.Module:
        """A plain layer of the base's kind (Linear or Conv1D) computing the adapted forward."""
        weight = self.merged_weight().detach()
        bias = self.base.bias
        if isinstance(self.base, Conv1D):
            layer = Conv1D(self.out_features, self.in_features)
            layer.weight = nn.Parameter(weight.T.contiguous().to(self.base.weight.dtype), requires_grad=False)
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
            dtype = weight.dtype if self.base.weight.dtype == torch.uint8 else self.base.weight.dtype
            layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer.to(weight.device)

    def peft_state(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's key names, relative to this module (e.g. `lora_A.weight`)."""
        raise NotImplementedError

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Method:
    """One entry of the registry: how a method builds its layers, optimizer and after-step rule."""

    name: str
    """Registry key and CLI/UI value, e.g. `lora-plus`."""
    title: str
    """Display name, e.g. `LoRA+`."""
    summary: str
    """One line for the UI: what the method trades."""
    paper: str
    """Citation with arXiv id."""
    hook: str
    """`layer`, `optimizer` or `after-step`."""
    build_layer: Callable[..., AdapterLayer]
    """(base_layer, cfg, context) -> adapter layer; `context` is shared by all layers of one model."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Values for unset config fields (rank, alpha, lr, ...) and method options."""
    peft_type: str = "LORA"
    """`LORA` or `VERA`: the peft config class the exported adapter maps to."""
    peft_fields: dict[str, Any] = field(default_factory=dict)
    """adapter_config.json fields that mark this method in PEFT's format (DoRA: `use_dora: true`);
    a foreign adapter whose config holds them is read as this method."""
    peft_settings: Callable[[dict], dict] | None = None
    """(adapter_config) -> our settings, for a foreign peft adapter; None: LoRA's (r, lora_alpha, use_rslora)."""
    writes_base: bool = False
    """True where training changes the frozen base weight too (Delta-LoRA's after-step rule): the
    base then stays in full precision, and checkpoints save it."""
    supports_4bit: bool = True
    """False where the method must write the base weight (Delta-LoRA)."""
    why_not_4bit: str = ""
    """Shown when a 4-bit base is refused: why, and what to pick instead."""
    fsdp_note: str | Callable[[Any], str | None] | None = None
    """Why the method cannot train with `--strategy fsdp` (its maths needs whole tensors outside
    a layer's forward, where FSDP2 holds only this rank's rows), or (cfg) -> that reason where
    it depends on an option; None: it shards."""
    new_context: Callable[[nn.Module, list[str], Any], dict] = lambda model, names, cfg: {}
    """Builds what all layers of one model share (VeRA's frozen random matrices)."""
    build_optimizer: Callable[..., torch.optim.Optimizer] | None = None
    """(model, cfg) -> optimizer; None means AdamW over the trainable parameters."""
    after_step: Callable[..., None] | None = None
    """(model, cfg, step) run after every optimizer step."""
    keeps_layer_input: bool = True
    """Memory estimate: False where backward needs no adapted layer's input (LoRA-FA: A is frozen)."""
    saved_per_linear: Callable[[int, int], int] = lambda rank, d_out: rank
    """Memory estimate: (rank, d_out) -> elements per token the adapter saves for backward per
    adapted linear, besides the layer input (LoRA: x·Aᵀ, r of them)."""
    init_changes_base: bool = False
    """True where the adapted model differs from the base at step 0 by design."""
    uses_lr_ratio: bool = False
    """True where B gets its own learning rate, lr * lr_ratio (LoRA+); elsewhere lr_ratio must stay 1."""
    check: Callable[[Any], None] | None = None
    """(cfg) -> None, raising ValueError for settings this method cannot honour (e.g. dropout)."""
    export_state: Callable[[nn.Module, dict], dict[str, torch.Tensor]] | None = None
    """(model, settings) -> tensors under PEFT key names; None: each layer's `peft_state()`."""
    export_config: Callable[[nn.Module, dict, dict], dict] | None = None
    """(model, settings, adapter_config) -> the adapter_config.json to write (VeRA's fields, Delta-LoRA's rank)."""
    import_state: Callable[[nn.Module, dict[str, torch.Tensor], Any, list[str]], set[str]] | None = None
    """(model, tensors, cfg, modules) -> keys used: inject and load an exported adapter; None:
    inject this method and load each layer's tensors with `load_layer_states`."""

    def option(self, cfg: Any, key: str) -> Any:
        """A method option: `cfg.method_options[key]`, else this method's default."""
        options = getattr(cfg, "method_options", None) or {}
        return options[key] if key in options else self.defaults[key]

    def make_optimizer(self, model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
        """This method's optimizer: its own `build_optimizer`, else AdamW over the trainable parameters."""
        if self.build_optimizer is not None:
            return self.build_optimizer(model, cfg)
        params = list(trainable_parameters(model).values())
        return adamw(params, cfg)

    @property
    def option_names(self) -> list[str]:
        """Default keys that are method options: every key that is not a TrainConfig field."""
        from lora_studio.config import FIELD_NAMES

        return sorted(k for k in self.defaults if k not in FIELD_NAMES)

    @property
    def plain_lora(self) -> bool:
        """Whether the exported adapter is a plain peft LoRA, W + s·B·A (what llama.cpp's GGUF LoRA holds)."""
        return self.peft_type == "LORA" and not self.peft_fields

    def settings_from_peft(self, config: dict) -> dict:
        """Our settings for a foreign peft adapter of this method, from its adapter_config.json."""
        if self.peft_settings is not None:
            return {"method": self.name, **self.peft_settings(config)}
        return {
            "method": self.name,
            "rank": config["r"],
            "alpha": config.get("lora_alpha", config["r"]),
            "dropout": 0.0,
            "use_rslora": bool(config.get("use_rslora")),
        }


def check_config(method: Method, cfg: Any) -> None:
    """Refuse settings that cannot work with `method`, before anything is trained, saying why
    and what to pick instead."""
    problems = []
    options = dict(getattr(cfg, "method_options", None) or {})
    unknown = sorted(set(options) - set(method.option_names))
    if unknown:
        allowed = ", ".join(method.option_names) or "none"
        problems.append(f"{method.name} has no option {', '.join(unknown)} (its options: {allowed})")
    lr_ratio = getattr(cfg, "lr_ratio", None)
    if lr_ratio not in (None, 1, 1.0) and not method.uses_lr_ratio:
        problems.append(
            f"lr_ratio={lr_ratio} only applies to lora-plus (B learns lr_ratio times faster); "
            f"{method.name} trains A and B at one rate: pick --method lora-plus or drop --lr-ratio"
        )
    four_bit = getattr(cfg, "quantize", None) == "4bit"
    if four_bit and not method.supports_4bit:
        problems.append(f"{method.title} cannot train on a 4-bit base: {method.why_not_4bit}")
    if four_bit and getattr(cfg, "merge", False):
        problems.append(
            "--merge cannot fold the adapter into a 4-bit base in place (the NF4 grid would round the "
            "update away): save the adapter only, or train without --quantize to get a merged model"
        )
    if problems:
        raise ValueError("; ".join(problems))
    if method.check is not None:
        method.check(cfg)


def find_targets(model: nn.Module, target: str | list[str]) -> list[str]:
    """Names of the linear layers to adapt.

    `all-linear` takes every linear layer except the output head (and anything tied to the
    embeddings); otherwise `target` names modules by their last name component
    (`q_proj,v_proj`) or their full path.
    """
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear_types = (nn.Linear, Conv1D) + _linear4bit_type()
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, linear_types) and module is not out_emb and name
    ]
    if target in ("all-linear", ["all-linear"]):
        names = candidates
    else:
        wanted = [t.strip() for t in (target.split(",") if isinstance(target, str) else target) if t.strip()]
        names = [n for n in candidates if any(n == t or n.endswith("." + t) for t in wanted)]
        if not names:
            short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise ValueError(
                f"target {target!r} matches no linear layer of this model; "
                f"its linear layers are named: {', '.join(short)} (or use all-linear)"
            )
    if not names:
        raise ValueError("this model has no linear layer to adapt")
    return names


def inject_adapters(model: nn.Module, method: Method, cfg: Any) -> list[str]:
    """Freeze the model and replace each target linear with the method's adapter layer."""
    check_config(method, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # bitsandbytes would repack NF4 weights for a bf16 CPU kernel at the first no-grad
            # eval call: compute then silently drops to bf16 and the weight can no longer be
            # dequantized for DoRA's norm or a merge. Keep the configured compute dtype.
            module.support_avx512bf16_for_cpu = False
    names = find_targets(model, cfg.target)
    context = method.new_context(model, names, cfg)
    for name in names:
        base = model.get_submodule(name)
        layer = method.build_layer(base, cfg, context)
        layer.to(device=_param_device(base))
        model.set_submodule(name, layer)
    model.lora_studio_method = method.name  # type: ignore[attr-defined]
    return names


def _param_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter layer returns its base output untouched."""
    layers = list(adapter_layers(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter layer with one plain layer of the same forward (in place)."""
    for name, layer in list(adapter_layers(model).items()):
        model.set_submodule(name, layer.merged_layer())
    return model


def load_layer_states(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "base_model.model.") -> set[str]:
    """Load each adapter layer's tensors (PEFT key names under `prefix`); returns the keys used.

    Every layer must find all its tensors: peft would skip a misnamed key silently.
    """
    used: set[str] = set()
    for name, layer in adapter_layers(model).items():
        head = f"{prefix}{name}."
        sub = {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}
        expected = set(layer.peft_state())
        if not expected <= set(sub):
            raise ValueError(f"layer {name} lacks {', '.join(sorted(expected - set(sub)))}")
        layer.load_peft_state({k: sub[k] for k in expected})
        used.update(head + k for k in expected)
    return used


def lora_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
    """(A, B, scale s) of every LoRA-type adapter layer."""
    return [(m.lora_A, m.lora_B, m.scaling) for m in adapter_layers(model).values() if hasattr(m, "lora_B")]


def fused_adamw_ok(params: Any) -> bool:
    """Whether PyTorch's fused AdamW kernel can step these parameters (a list of tensors or of
    param groups): plain floating-point tensors on CPU or CUDA; not FSDP's DTensors."""
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    tensors = [p for group in groups for p in group["params"]]
    return bool(tensors) and all(
        type(p) is nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors
    )


def adamw(params: Any, cfg: Any, cls: type[torch.optim.AdamW] = torch.optim.AdamW, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW (`cls`: a subclass) over `params` at cfg.lr and cfg.weight_decay, fused into one
    kernel over all tensors where it can be: PyTorch's default steps each of the ~400 adapter
    tensors in its own loop of small operations (24 ms of a 0.7 s step on the bundled model on
    2 CPU cores, against 7 ms fused). Same update, other rounding: ~1e-7 relative on the weights."""
    fused = fused_adamw_ok(params) or None
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused, **kwargs)


class AdjustedAdamW(torch.optim.AdamW):
    """AdamW whose `step()` first rewrites the A/B gradients (LoRA-FA's projection, LoRA-Pro's
    correction), so the training loop calls `step()` as for any optimizer."""

    def __init__(self, params: Any, pairs: list[tuple[nn.Parameter, nn.Parameter, float]], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.pairs = pairs
        """(A, B, scale s) of every adapted layer."""

    def adjust_gradients(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:  # gradients first, then the rewrite, then AdamW
            with torch.enable_grad():
                loss = closure()
        self.adjust_gradients()
        super().step()
        return loss


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts its real element count."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if is_4bit(p):
            n = p.quant_state.shape.numel() if p.quant_state is not None else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
