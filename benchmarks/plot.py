"""The benchmark's loss plots: drawn by lora_studio.plot (shared with the bake-off)."""

from lora_studio.plot import loss_png, loss_svg  # noqa: F401
