"""The LoRA Studio web app (gradio). One `build_*_tab()` per tab; none of them trains or
generates by itself: they call the data API, the runner, the chat engine and the exporters."""

from lora_studio.ui.app import build_app, launch
from lora_studio.ui.settings import AppSettings

__all__ = ["AppSettings", "build_app", "launch"]
