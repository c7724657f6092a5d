"""lora_studio/preflight.py: the pre-run checks the Train tab and the CLI share, on plain values."""

from __future__ import annotations

import pytest

from lora_studio.config import TrainConfig
from lora_studio.data import Example, held_out_count, split_examples
from lora_studio.methods import REGISTRY
from lora_studio.preflight import check_batch, preflight


@pytest.mark.parametrize("rows,fraction", [(24, 0.1), (10, 0.25), (2, 0.9), (7, 0.5), (100, 0.01)])
def test_held_out_count_is_the_split_the_run_makes(rows, fraction):
    examples = [Example([i], [i]) for i in range(rows)]
    _, val = split_examples(examples, fraction, seed=0)
    assert held_out_count(rows, fraction) == len(val)


def test_held_out_count_by_hand():
    assert held_out_count(24, 0.1) == 2  # round(2.4)
    assert held_out_count(10, 0.01) == 1  # at least one
    assert held_out_count(2, 0.9) == 1  # at least one left to train
    assert held_out_count(1, 0.5) == 0 and held_out_count(10, 0.0) == 0


def test_batch_larger_than_the_training_rows_is_refused_after_the_split(tiny_llama_dir):
    cfg = TrainConfig(data="x", out="x", model=tiny_llama_dir, rank=4, batch_size=23, val_fraction=0.1)
    with pytest.raises(ValueError, match=r"batch_size \(23\) is larger than the data \(22 training examples\); "
                                         r"use a batch size of 22 or less"):
        preflight(cfg, rows=24, memory_mb=1e9)
    assert preflight(TrainConfig(**{**cfg.to_dict(), "batch_size": 22}), rows=24, memory_mb=1e9).total_mb > 0
    # Packing fills rows with several examples: the batch is not held to the row count.
    assert preflight(TrainConfig(**{**cfg.to_dict(), "batch_size": 40, "packing": True}), rows=24, memory_mb=1e9)
    assert preflight(cfg, rows=None, memory_mb=1e9)  # rows unknown: not checked here (the run checks)


def test_memory_beyond_the_machine_is_refused_naming_both_numbers(tiny_llama_dir):
    cfg = TrainConfig(data="x", out="x", model=tiny_llama_dir, rank=4, batch_size=4)
    est = preflight(cfg, rows=24, max_tokens=64, memory_mb=1e9)
    with pytest.raises(ValueError, match=r"the memory estimate \(.* GiB\) is more than this machine has \(0\.1 GiB\): "
                                         r"lower the rank, batch size or max length"):
        preflight(cfg, rows=24, max_tokens=64, memory_mb=100.0)
    assert preflight(cfg, rows=24, max_tokens=64, memory_mb=est.total_mb) == est  # exactly enough is enough


def test_a_target_the_model_cannot_take_is_named(tiny_llama_dir):
    cfg = TrainConfig(data="x", out="x", model=tiny_llama_dir, rank=4, target="zzz_nomatch")
    with pytest.raises(ValueError, match="cannot set up lora on .*matches no linear layer"):
        preflight(cfg, rows=24, memory_mb=1e9)


def test_check_batch_alone():
    check_batch(4, 4)
    with pytest.raises(ValueError, match=r"batch_size \(5\) is larger than the data \(4 training examples\)"):
        check_batch(5, 4)


@pytest.mark.parametrize("method", list(REGISTRY))
def test_every_method_passes_the_preflight_with_its_defaults(tiny_llama_dir, method):
    # What the Train tab and `python -m lora_studio train` run before any run: the estimate builds
    # the model and its adapter on the meta device, where a method's code must not fail.
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(data="x", out="x", model=tiny_llama_dir, method=method, batch_size=2, precision=precision)
        assert preflight(cfg, rows=24, max_tokens=32, memory_mb=1e9).total_mb > 0
