"""`--merge`: the merged full model saved in the run folder reproduces the adapted model."""

from __future__ import annotations

import torch

from lora_studio.adapters import load_adapter
from lora_studio.cli import main
from lora_studio.methods import adapter_layers
from lora_studio.models import load_model
from tests.conftest import format_rows, write_jsonl
from tests.helpers import logits, sample_ids


def test_merged_model_equals_base_plus_adapter(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", format_rows(8))
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--model", tiny_model_dir,
                 "--lr", "1e-2", "--max-steps", "3", "--batch-size", "4", "--merge"]) == 0
    merged = load_model(str(run / "merged"))
    assert not adapter_layers(merged)
    adapted = load_model(tiny_model_dir)
    load_adapter(adapted, run / "adapter")
    ids = sample_ids(merged.config.vocab_size)
    expected = logits(adapted, ids)
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, logits(load_model(tiny_model_dir), ids), atol=1e-3)
    assert (run / "merged" / "tokenizer_config.json").exists()
