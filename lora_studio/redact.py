"""Keep access tokens out of everything LoRA Studio writes: status.json errors, error logs,
CLI messages. Hub tokens reach the engine only through the environment (HF_TOKEN and
friends, read by huggingface_hub itself); nothing here stores or prints the environment.

    redact("401 for hf_AbCdEf0123456789") -> "401 for hf_***"
"""

from __future__ import annotations

import re
from typing import Any

# Hugging Face user/org tokens (hf_...), OpenAI-style keys (sk-...) and HTTP auth headers.
TOKEN = re.compile(r"\b(hf_|api_org_|sk-)[A-Za-z0-9_-]{10,}")
_BEARER = re.compile(r"(?i)\b(bearer|token)(\s*[=:]?\s*)[A-Za-z0-9._~+/-]{16,}=*")


def redact(text: Any) -> Any:
    """`text` with every token-like value replaced by `<prefix>***` (non-strings unchanged)."""
    if not isinstance(text, str):
        return text
    text = TOKEN.sub(lambda m: m.group(1) + "***", text)
    return _BEARER.sub(lambda m: m.group(1) + m.group(2) + "***", text)


def looks_like_token(text: Any) -> bool:
    return isinstance(text, str) and TOKEN.search(text) is not None
