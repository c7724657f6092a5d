"""The worker side of the bench: the scoring against hand-made numbers, and the baseline's
adapter init against ours."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import variants
from lora_studio.data import Example


def test_evaluate_counts_loss_and_accuracy_by_hand():
    """A fake model whose logits are fixed: loss and accuracies computed by hand."""
    vocab = 5

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            # Predicts token (input + 1) % vocab with logit 2, every other token 0.
            logits = torch.zeros(*input_ids.shape, vocab)
            logits.scatter_(-1, ((input_ids + 1) % vocab)[..., None], 2.0)
            return type("Out", (), {"logits": logits})()

    # Row 1: labels at positions 2, 3 -> targets 3 (right: 2+1) and 0 (wrong: 3+1=4).
    # Row 2: label at position 1 -> target 2, predicted from token 1 (right: 1+1).
    examples = [Example([1, 2, 3, 0], [-100, -100, 3, 0]), Example([1, 2, 3], [-100, 2, -100])]
    r = variants.evaluate(Fixed(), examples, pad_id=0, batch_size=2, device=torch.device("cpu"))
    right = -math.log(math.exp(2) / (math.exp(2) + 4))
    wrong = -math.log(1 / (math.exp(2) + 4))
    assert r["eval_loss"] == pytest.approx((2 * right + wrong) / 3)
    assert r["eval_token_acc"] == pytest.approx(2 / 3)
    assert r["eval_reply_acc"] == pytest.approx(1 / 2)
    assert r["eval_tokens"] == 3


def test_the_baseline_starts_from_our_adapter_init(tiny_llama_dir):
    peft = pytest.importorskip("peft")
    from lora_studio.config import TrainConfig
    from lora_studio.methods import adapter_layers, get_method, inject_adapters
    from lora_studio.models import load_model

    cfg = TrainConfig(data="x", out="x", rank=4, seed=3).resolved()
    ours = load_model(tiny_llama_dir)
    torch.manual_seed(cfg.seed)
    inject_adapters(ours, get_method("lora"), cfg)
    theirs = peft.get_peft_model(
        load_model(tiny_llama_dir),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert variants.same_init_as_ours(theirs, cfg.seed) == len(adapter_layers(ours)) == 14
    for name, layer in adapter_layers(ours).items():
        module = theirs.base_model.model.get_submodule(name)
        assert torch.equal(module.lora_A["default"].weight, layer.lora_A)
        assert torch.equal(module.lora_B["default"].weight, layer.lora_B)
