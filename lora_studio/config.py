"""The one configuration object the UI and the CLI hand to the trainer.

It is saved as `config.json` in every run folder, so `python -m lora_studio train --config
RUN/config.json` repeats the run. Fields left `None` are filled from the chosen method's
defaults by `resolved()` (e.g. VeRA trains at a higher rank and learning rate than LoRA).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    data: str = ""
    """Training data: a JSONL, JSON, CSV, TSV or Parquet file, or a Hub dataset `owner/name[:config][@split]`."""
    out: str = ""
    """Run folder: config, metrics, status and the adapter are written here."""
    model: str = "bundled"
    """`bundled` (SmolLM2-135M-Instruct shipped offline), a Hub id, or a local folder."""
    method: str = "lora"
    """A name from `lora_studio.methods.REGISTRY`."""
    rank: int | None = None
    """Adapter rank r (method default when unset: 16 for LoRA)."""
    alpha: float | None = None
    """Scale numerator: s = alpha / r (alpha / sqrt(r) with rsLoRA). Default: 2 * rank."""
    dropout: float | None = None
    """Dropout on the adapter input; 0 keeps no mask and no copy of the input."""
    lr: float | None = None
    """Learning rate of the adapter (of A for LoRA+; B gets lr * lr_ratio)."""
    lr_ratio: float | None = None
    """Learning-rate ratio eta_B / eta_A (LoRA+); 1 for every other method by default."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, whatever `epochs` says."""
    batch_size: int = 8
    """Sequences per optimizer step."""
    max_seq_len: int = 512
    """Longer samples are truncated to this many tokens."""
    target: str = "all-linear"
    """`all-linear` (every linear layer of the blocks, never the LM head) or comma-separated module names."""
    seed: int = 0
    """Seeds adapter init, data order and dropout."""
    warmup_ratio: float = 0.03
    """Fraction of the steps with a linear learning-rate warmup; then linear decay to 0."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter parameters."""
    max_grad_norm: float | None = 1.0
    """Clip the adapter gradient norm to this (None: no clipping)."""
    use_rslora: bool = False
    """Scale by alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)."""
    system_prompt: str | None = None
    """A system message put before every sample (and used by chat/compare)."""
    trust_remote_code: bool = False
    """Run model code from the Hub. Off unless the user asks: it executes code from the repo."""
    merge: bool = False
    """Also save a merged full model in RUN/merged after training."""
    quantize: str | None = None
    """`4bit` stores the base in NF4 (QLoRA). None: full precision."""
    format: str | None = None
    """Row format: alpaca, messages, sharegpt, prompt-completion or text. None: detected from the columns."""
    columns: dict[str, str] = field(default_factory=dict)
    """Our field name -> the file's column, e.g. {"instruction": "question", "output": "answer"}."""
    val_data: str | None = None
    """A second file (or Hub split) held out for the eval loss; excludes val_fraction."""
    val_fraction: float = 0.0
    """Fraction of the training rows held out for the eval loss (0: none)."""
    packing: bool = False
    """Pack several samples into rows of up to max_seq_len tokens (no cross-sample attention)
    instead of padding them; batch_size then counts packed rows."""
    drop_invalid: bool = False
    """Drop rows with errors (and duplicate rows), counting them; False refuses such data."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """Options only one method reads (e.g. VeRA's `d_initial`, Delta-LoRA's `start_step`)."""
    grad_accum_steps: int = 1
    """Split each optimizer step's `batch_size` sequences into this many micro-batches run one
    after another (same update, less activation memory). Must not exceed `batch_size`."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of keeping them: about a
    third slower, activation memory from one per block to one block's worth."""
    precision: str = "auto"
    """`auto`: on a GPU bf16 autocast where it has bf16, else fp16; on a CPU bf16 autocast where
    bf16 products measure faster than fp32 ones (AMX, AMD Zen 4), else fp32. `fp32`, `bf16` or
    `fp16` (GPU only). With bf16 the frozen base is stored in bf16 (on a CPU only the linear
    weights: the same products as autocast over fp32 weights); adapter weights stay fp32."""
    compile: bool | str = "auto"
    """torch.compile each decoder layer (regional: one compiled code shared by every layer, so it
    compiles in tens of seconds, not minutes, and again only for the first layer's variant).
    Kernels are cached on disk under the model cache (`LORA_STUDIO_CACHE`/inductor): the next run
    on the same model starts warm. The status shows the seconds spent as `compile_s`. `auto`:
    the first steps run eagerly and are timed, then the layers are compiled only if the steps
    left are predicted to win back the compile time (`engine/autocompile.py`; the status's
    `compile` says what it decided and why). `true`: from the first step; `false`: never."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint (adapter, optimizer, scheduler, RNG, data position) every N
    optimizer steps; 0 saves only when the run stops or ends."""
    eval_every: int = 50
    """Compute the validation loss every N optimizer steps and at the last step (when there is
    validation data); 0: only at the last step."""
    strategy: str = "auto"
    """How several processes (torchrun, `--gpus N`) share the work. `ddp`: each holds the whole
    model and they average gradients (DistributedDataParallel). `fsdp`: FSDP2 shards the weights,
    the frozen base included, the adapter's gradients and the optimizer state, so each holds
    1/N of them: for models that do not fit one device (not with a 4-bit base, LoRA-Pro,
    Delta-LoRA or LoRA-FA's projected gradient). `auto`: DDP when the memory estimate fits one
    device, else FSDP. One process ignores it."""
    report_to: str | None = None
    """Also send each metrics row (what the charts show) to an experiment tracker: `trackio`,
    `tensorboard` (RUN/tensorboard) or `wandb`, each an optional package imported only then.
    None (default): nothing is sent anywhere."""
    probes: list[str] = field(default_factory=list)
    """Prompts the model answers greedily at each evaluation (every `eval_every` steps and the
    last step); the answers go to RUN/probes.jsonl as {"step", "prompt", "reply"}."""
    probe_max_new_tokens: int = 48
    """Longest probe answer (and test-file reply when early stopping on ROUGE-L), in tokens."""
    early_stop: int = 0
    """Stop when the watched value has not improved for this many evaluations in a row (0: never).
    It watches the eval loss, or the ROUGE-L of greedy replies to `test_data` when that is set;
    the best evaluation's adapter is the one saved, and the status says why and at which step."""
    test_data: str | None = None
    """Rows with a prompt and a reference reply (any training format): with `early_stop`,
    training stops on their ROUGE-L instead of the eval loss."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Atomically (temp file, fsync, rename): a run's config is never seen half-written."""
        from lora_studio.runfiles import write_json_atomic

        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def resolved(self) -> "TrainConfig":
        """A copy with every unset field filled from the method's defaults, then checked."""
        from lora_studio.methods import get_method

        method = get_method(self.method)
        cfg = dataclasses.replace(self, method_options=dict(self.method_options))
        for name, value in method.defaults.items():
            if name in FIELD_NAMES:  # a default for a config field; any other key is a method option
                if getattr(cfg, name) is None:
                    setattr(cfg, name, value)
            else:
                cfg.method_options.setdefault(name, value)
        if cfg.rank is None:
            cfg.rank = 16
        if cfg.alpha is None:
            cfg.alpha = 2.0 * cfg.rank
        if cfg.dropout is None:
            cfg.dropout = 0.0
        if cfg.lr is None:
            cfg.lr = 2e-4
        if cfg.lr_ratio is None:
            cfg.lr_ratio = 1.0
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Refuse nonsense up front, naming the field and what would work."""
        problems = []
        if self.rank is not None and self.rank < 1:
            problems.append(f"rank must be at least 1 (got {self.rank})")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr must be positive (got {self.lr})")
        if self.lr_ratio is not None and not self.lr_ratio > 0:
            problems.append(f"lr_ratio must be positive (got {self.lr_ratio})")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.report_to is not None:
            from lora_studio.tracking import TRACKERS

            if self.report_to not in TRACKERS:
                problems.append(f"report_to must be one of {', '.join(TRACKERS)} or None (got {self.report_to!r})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1 (got {self.batch_size})")
        if self.max_seq_len < 8:
            problems.append(f"max_seq_len must be at least 8 (got {self.max_seq_len})")
        if not self.epochs > 0:
            problems.append(f"epochs must be positive (got {self.epochs})")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be at least 1 (got {self.max_steps})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in [0, 1) (got {self.val_fraction})")
        if self.val_data and self.val_fraction:
            problems.append("give val_data or val_fraction, not both")
        from lora_studio.data.formats import FORMATS

        if self.format not in (None, *FORMATS):
            problems.append(f"format must be one of {', '.join(FORMATS)} or unset (got {self.format!r})")
        if self.grad_accum_steps < 1:
            problems.append(f"grad_accum_steps must be at least 1 (got {self.grad_accum_steps})")
        elif self.grad_accum_steps > self.batch_size:
            problems.append(
                f"grad_accum_steps ({self.grad_accum_steps}) cannot exceed batch_size ({self.batch_size}): "
                "each micro-batch needs at least one sequence"
            )
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision must be auto, fp32, bf16 or fp16 (got {self.precision!r})")
        if self.compile not in (True, False, "auto"):
            problems.append(f"compile must be true, false or auto (got {self.compile!r})")
        if self.strategy not in ("auto", "ddp", "fsdp"):
            problems.append(f"strategy must be auto, ddp or fsdp (got {self.strategy!r})")
        if self.checkpoint_every < 0:
            problems.append(f"checkpoint_every must be 0 or more (got {self.checkpoint_every})")
        if self.eval_every < 0:
            problems.append(f"eval_every must be 0 or more (got {self.eval_every})")
        if self.early_stop < 0:
            problems.append(f"early_stop must be 0 or more (got {self.early_stop})")
        elif self.early_stop and not (self.val_data or self.val_fraction or self.test_data):
            problems.append("early_stop needs something to watch: validation data (val_data or val_fraction) or test_data")
        if any(not isinstance(p, str) or not p.strip() for p in self.probes):
            problems.append("probes must be non-empty prompts")
        if self.probe_max_new_tokens < 1:
            problems.append(f"probe_max_new_tokens must be at least 1 (got {self.probe_max_new_tokens})")
        if self.quantize not in (None, "4bit"):
            problems.append(f"quantize must be '4bit' or unset (got {self.quantize!r})")
        from lora_studio.redact import looks_like_token

        for name in ("model", "data", "val_data", "test_data", "out", "target"):  # a token pasted in the wrong box
            if looks_like_token(getattr(self, name)):
                problems.append(f"{name} looks like an access token; tokens go in HF_TOKEN, never in run settings")
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))
"""TrainConfig's fields: a method default under one of these names fills that field."""
