"""Base vs tuned: one model in memory, the adapter switched off for the base reply and on
for the tuned one, with the chat template and system prompt the run was trained with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lora_studio.adapters import load_adapter, read_adapter_record
from lora_studio.data import DataError
from lora_studio.methods import disable_adapter
from lora_studio.models import load_model, load_tokenizer


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    """Longest reply, in tokens."""
    temperature: float = 0.0
    """0 decodes greedily (the default, so comparisons are repeatable)."""
    top_p: float = 1.0
    """Nucleus sampling threshold when temperature > 0."""
    seed: int = 0
    """Seed for sampling, reset before each reply so base and tuned draw alike."""


def default_generation(model: nn.Module) -> GenerationSettings:
    """The settings chat and compare start from for a run: the model's own generation config
    where it asks for sampling, else greedy; saved with the adapter so they are reused."""
    config = getattr(model, "generation_config", None)
    settings = GenerationSettings()
    if config is not None and getattr(config, "do_sample", False):
        settings.temperature = float(config.temperature or 1.0)
        settings.top_p = float(config.top_p or 1.0)
    if config is not None and getattr(config, "max_new_tokens", None):
        settings.max_new_tokens = int(config.max_new_tokens)
    return settings


class TunedModel:
    """A base model with a run's adapter loaded, able to answer as base or as tuned."""

    def __init__(self, run_dir: str | Path, device: str | None = None) -> None:
        run = Path(run_dir)
        adapter_dir = run / "adapter" if (run / "adapter").exists() else run
        record = read_adapter_record(adapter_dir)
        settings = record["settings"]
        self.model_spec = record.get("base_model") or settings.get("model", "bundled")
        trust = bool(settings.get("trust_remote_code", False))
        self.tokenizer = load_tokenizer(self.model_spec, trust)
        if record.get("chat_template"):
            self.tokenizer.chat_template = record["chat_template"]
        self.system_prompt = record.get("system_prompt")
        known = set(GenerationSettings.__dataclass_fields__)
        self.generation = GenerationSettings(**{k: v for k, v in (record.get("generation") or {}).items() if k in known})
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model: nn.Module = load_model(self.model_spec, trust_remote_code=trust, quantize=settings.get("quantize"))
        load_adapter(self.model, adapter_dir)
        self.model.to(self.device).eval()

    def _input_ids(self, prompt: str) -> torch.Tensor:
        return self.messages_ids([{"role": "user", "content": prompt}])

    def messages_ids(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """(1, T) prompt ids of a conversation, the run's system prompt put first."""
        text = prompt_text(self.tokenizer, messages, self.system_prompt)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    @torch.no_grad()
    def reply(self, prompt: str, tuned: bool, settings: GenerationSettings | None = None) -> str:
        ids = self._input_ids(prompt)
        kwargs = self.generate_kwargs(ids, settings)
        if tuned:
            out = self.model.generate(ids, **kwargs)
        else:
            with disable_adapter(self.model):
                out = self.model.generate(ids, **kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    def generate_kwargs(self, ids: torch.Tensor, settings: GenerationSettings | None = None) -> dict[str, Any]:
        """Arguments of `generate` for these settings (default: the run's saved settings)."""
        return generation_kwargs(self.tokenizer, settings or self.generation, torch.ones_like(ids))


def prompt_text(tokenizer: Any, messages: list[dict[str, str]], system_prompt: str | None = None) -> str:
    """The chat-template text of a conversation ready for the reply, `system_prompt` put first."""
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generation_kwargs(tokenizer: Any, settings: GenerationSettings, attention_mask: torch.Tensor) -> dict[str, Any]:
    """Arguments of `generate`: greedy at temperature 0, else sampled with the settings' seed."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "attention_mask": attention_mask,
    }
    if settings.temperature > 0:
        torch.manual_seed(settings.seed)
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def read_prompts(path: str | Path) -> list[str]:
    """JSONL with a `prompt` field per line, or plain text with one prompt per line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = []
    is_jsonl = path.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{"))
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, row {i}: not valid JSON ({e.msg})") from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{path}, row {i}, field 'prompt': missing or empty")
            prompts.append(prompt)
        else:
            prompts.append(line.strip())
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def compare(
    tuned: TunedModel, prompts: list[str], settings: GenerationSettings | None = None
) -> Iterator[dict[str, str]]:
    for prompt in prompts:
        yield {
            "prompt": prompt,
            "base": tuned.reply(prompt, tuned=False, settings=settings),
            "tuned": tuned.reply(prompt, tuned=True, settings=settings),
        }
