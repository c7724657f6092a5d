"""LoRA Studio: fine-tune a language model with LoRA-family methods, from a browser or a CLI.

The fine-tuning core is plain PyTorch (no `peft` import here); adapters are written in
PEFT's file format so they load in peft, vLLM and TGI.
"""

__version__ = "0.1.0"
