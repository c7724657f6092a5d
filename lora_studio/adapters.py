"""Adapter files in PEFT's format, written and read without importing peft.

A folder holds:
  adapter_config.json        peft's config (sorted keys): peft_type, r, lora_alpha, target_modules, ...
  adapter_model.safetensors  keys `base_model.model.<module path>.lora_A.weight` etc., metadata {"format": "pt"}
  lora_studio.json           our own record: method, resolved settings, chat template, EOS
peft ignores the last file; our loader uses it to rebuild the exact method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_studio.methods import adapter_layers, get_method, inject_adapters, method_for_peft_config
from lora_studio.methods.base import Conv1D, is_linear, load_layer_states
from lora_studio.runfiles import write_bytes_atomic

PEFT_PREFIX = "base_model.model."
STUDIO_FILE = "lora_studio.json"


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Short names (`q_proj`) when peft's suffix matching selects exactly the adapted set, else full paths."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear_paths = set(names) | {
        n for n, m in model.named_modules() if is_linear(m) and m is not out_emb and not n.endswith(".base")
    }
    selected = {p for p in linear_paths if p.rsplit(".", 1)[-1] in short}
    return short if selected == set(names) else sorted(names)


def peft_config(model: nn.Module, settings: dict[str, Any], base_model: str) -> dict[str, Any]:
    """adapter_config.json for the adapter now in `model`."""
    layers = adapter_layers(model)
    method = get_method(settings["method"])
    config: dict[str, Any] = {
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": any(isinstance(layer.base, Conv1D) for layer in layers.values()),
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "modules_to_save": None,
        "peft_type": method.peft_type,
        "r": settings["rank"],
        "revision": None,
        "target_modules": _target_modules(model, list(layers)),
        "task_type": "CAUSAL_LM",
    }
    if method.peft_type == "LORA":
        config.update(
            lora_alpha=settings["alpha"],
            lora_dropout=settings["dropout"],
            use_rslora=settings.get("use_rslora", False),
            use_dora=False,
        )
        config.update(method.peft_fields)  # DoRA: use_dora
    if method.export_config is not None:
        config = method.export_config(model, settings, config)
    return config


def save_adapter(
    model: nn.Module, out_dir: str | Path, settings: dict[str, Any], base_model: str, extra: dict | None = None
) -> Path:
    """Write the adapter now in `model` to `out_dir` in PEFT's format (and our own record)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapter layers to save")
    method = get_method(settings["method"])
    tensors: dict[str, torch.Tensor] = {}
    if method.export_state is not None:
        tensors.update(method.export_state(model, settings))
    else:
        for name, layer in layers.items():
            for key, value in layer.peft_state().items():
                tensors[f"{PEFT_PREFIX}{name}.{key}"] = value
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    require_finite(tensors, f"the adapter in {out}")
    config = peft_config(model, settings, base_model)
    # Written then renamed, so an interrupted save never leaves a half-written adapter.
    _atomic_write_bytes(out / "adapter_config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    tmp = out / ".adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "adapter_model.safetensors")
    record = {"method": settings["method"], "settings": settings, "modules": sorted(layers), **(extra or {})}
    _atomic_write_bytes(out / STUDIO_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return out


def require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write NaN or inf weights: a file that loads but answers garbage is worse than none."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"not writing {what}: {len(bad)} tensor(s) hold NaN or inf (first: {bad[0]}); training diverged. "
            "Lower the learning rate and train again"
        )


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def read_adapter_record(adapter_dir: str | Path) -> dict[str, Any]:
    """Our record of an adapter; for a foreign peft adapter, one derived from its config."""
    folder = Path(adapter_dir)
    studio = folder / STUDIO_FILE
    if studio.exists():
        return json.loads(studio.read_text())
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} holds no adapter_config.json")
    config = json.loads(cfg_path.read_text())
    method = method_for_peft_config(config)
    if method is None:
        raise ValueError(f"{cfg_path}: adapters of peft_type {config.get('peft_type')!r} are not supported")
    return {"method": method.name, "settings": method.settings_from_peft(config)}


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> dict[str, Any]:
    """Inject the adapter saved in `adapter_dir` into `model` and load its tensors.

    Every tensor in the file must land in a layer, and every layer must get its tensors:
    a mismatch is an error here (peft would ignore it silently).
    """
    from lora_studio.config import TrainConfig

    folder = Path(adapter_dir)
    record = read_adapter_record(folder)
    settings = dict(record["settings"])
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    method = get_method(settings["method"])
    modules = record.get("modules") or _adapted_modules(tensors)
    fields = {k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**fields)
    cfg.target = ",".join(modules)
    with torch.random.fork_rng():  # the init is overwritten; keep the caller's RNG stream
        try:
            if method.import_state is not None:
                used = method.import_state(model, tensors, _ExactTargets(cfg, modules), modules)
            else:
                inject_adapters(model, method, _ExactTargets(cfg, modules))
                used = load_layer_states(model, tensors, PEFT_PREFIX)
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from None
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{folder}: tensors that match no layer: {', '.join(unused[:5])}")
    return record


def _adapted_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module paths of a foreign adapter, from its keys (`<path>.lora_A.weight`, `<path>.vera_lambda_b`)."""
    paths = set()
    for key in tensors:
        if not key.startswith(PEFT_PREFIX):
            continue  # VeRA's shared `base_model.vera_A` / `base_model.vera_B`
        for marker in (".lora_", ".vera_lambda_"):
            if marker in key:
                paths.add(key[len(PEFT_PREFIX) : key.index(marker)])
    return sorted(paths)


class _ExactTargets:
    """A config view whose `target` is the exact list of module paths (full-path matching)."""

    def __init__(self, cfg: Any, modules: list[str]) -> None:
        self._cfg = cfg
        self.target = list(modules)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cfg, name)
