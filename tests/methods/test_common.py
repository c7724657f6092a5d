"""The common checks, run over every method of the registry on a tiny Llama and a tiny GPT-2."""

from __future__ import annotations

import pytest
import torch

from lora_studio.adapters import load_adapter, save_adapter
from lora_studio.methods import REGISTRY, adapter_layers, disable_adapter, get_method, merge_adapters
from lora_studio.models import load_model
from tests.helpers import adapted, logits, perturb, sample_ids

METHODS = list(REGISTRY)


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method, tiny_model_dir):
    if get_method(method).init_changes_base:
        pytest.skip(f"{method} changes the base at init by design")
    base = load_model(tiny_model_dir)
    model, _ = adapted(tiny_model_dir, method)
    ids = sample_ids(base.config.vocab_size)
    torch.testing.assert_close(logits(model, ids), logits(base, ids))


def _options(method: str) -> dict:
    # Delta-LoRA from step 1, so its rule on W is checked by the same single step.
    return {"method_options": {"start_step": 0}} if "start_step" in get_method(method).option_names else {}


@pytest.mark.parametrize("method", METHODS)
def test_step_changes_only_the_adapter(method, tiny_model_dir):
    model, cfg = adapted(tiny_model_dir, method, **_options(method))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = get_method(cfg.method).make_optimizer(model, cfg)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    model.train()
    ids = sample_ids(model.config.vocab_size, batch=4, length=16)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    optimizer.step()
    m = get_method(method)
    if m.after_step is not None:
        m.after_step(model, cfg, 1)
    moved_bases = set()
    for name, layer in adapter_layers(model).items():
        key = f"{name}.base.weight"
        if m.writes_base:  # Delta-LoRA, the one method that writes the base:
            # W1 = W0 + λ·s·(B1 A1 − B0 A0), B0 = 0; stored transposed for GPT-2's Conv1D
            lam = cfg.method_options["lambda"]
            delta = lam * layer.scaling * (layer.lora_B @ layer.lora_A)
            expected = frozen_before[key] + (delta.T if layer.fan_in_fan_out else delta)
            torch.testing.assert_close(layer.base.weight, expected, rtol=0, atol=1e-7)
            assert not torch.equal(layer.base.weight, frozen_before[key])
            moved_bases.add(key)
    for n, p in model.named_parameters():
        if n in frozen_before and n not in moved_bases:
            assert torch.equal(p, frozen_before[n]), f"frozen parameter {n} changed"
        if n in frozen_before:
            assert p.grad is None, f"frozen parameter {n} got a gradient"
            assert id(p) not in in_optimizer, f"frozen parameter {n} is in the optimizer"
    changed = [n for n, p in model.named_parameters() if n in trainable_before and not torch.equal(p, trainable_before[n])]
    assert changed, "no adapter parameter moved after one step"


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_forward(method, tiny_model_dir):
    model, _ = adapted(tiny_model_dir, method)
    perturb(model)
    ids = sample_ids(model.config.vocab_size)
    expected = logits(model, ids)
    merge_adapters(model)
    assert not adapter_layers(model)
    # Whole-model logits: float32 sums in another order across 2 blocks (the per-layer
    # check with torch.testing's defaults is in test_lora.py).
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_disable_equals_base_bit_for_bit(method, tiny_model_dir):
    base = load_model(tiny_model_dir)
    model, _ = adapted(tiny_model_dir, method)
    perturb(model)
    ids = sample_ids(base.config.vocab_size)
    tuned = logits(model, ids)
    with disable_adapter(model):
        assert torch.equal(logits(model, ids), logits(base, ids))
    assert not torch.allclose(tuned, logits(base, ids)), "the perturbed adapter should change the output"
    torch.testing.assert_close(logits(model, ids), tuned)  # re-enabled after the block


@pytest.mark.parametrize("method", METHODS)
def test_export_reload_round_trip(method, tiny_model_dir, tmp_path):
    model, cfg = adapted(tiny_model_dir, method)
    perturb(model)
    ids = sample_ids(model.config.vocab_size)
    expected = logits(model, ids)
    save_adapter(model, tmp_path / "adapter", cfg.to_dict(), tiny_model_dir)
    fresh = load_model(tiny_model_dir)
    torch.manual_seed(123)  # a different init: the loaded tensors must override it
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_trains_end_to_end(method, tiny_llama_dir, train_file, tmp_path):
    """The training loop runs each method unchanged; the saved adapter reloads and is not the base."""
    import json
    import math

    from lora_studio.config import TrainConfig
    from lora_studio.engine.run import train

    cfg = TrainConfig(
        data=str(train_file), out=str(tmp_path / "run"), model=tiny_llama_dir, method=method,
        rank=4, max_steps=3, batch_size=4, max_seq_len=64, lr=1e-2, warmup_ratio=0.0,
    )
    status = train(cfg)
    assert status["state"] == "done", status.get("error")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    if method == "lora-plus":
        assert rows[0]["lrs"][1] == pytest.approx(16 * rows[0]["lrs"][0])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method"] == method
    model = load_model(tiny_llama_dir)
    load_adapter(model, tmp_path / "run" / "adapter")
    ids = sample_ids(model.config.vocab_size)
    assert not torch.allclose(logits(model, ids), logits(load_model(tiny_llama_dir), ids), atol=1e-4)


def test_unknown_option_fails_the_run_up_front(tiny_llama_dir, train_file, tmp_path):
    from lora_studio.config import TrainConfig
    from lora_studio.engine.run import train

    cfg = TrainConfig(data=str(train_file), out=str(tmp_path / "run"), model=tiny_llama_dir, method="vera",
                      method_options={"d_inital": 0.5}, max_steps=1)
    status = train(cfg)
    assert status["state"] == "failed"
    assert "vera has no option d_inital (its options: d_initial, projection_prng_key)" in status["error"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_impossible_combinations_are_refused_before_any_work(tiny_llama_dir):
    """Read from the settings alone (no 4-bit model needed): why, and what to pick instead."""
    with pytest.raises(ValueError, match=r"Delta-LoRA cannot train on a 4-bit base: .*Pick lora.*without --quantize"):
        adapted(tiny_llama_dir, "delta-lora", quantize="4bit")
    with pytest.raises(ValueError, match="--merge cannot fold the adapter into a 4-bit base.*train without --quantize"):
        adapted(tiny_llama_dir, "dora", quantize="4bit", merge=True)
    for method in METHODS:
        if get_method(method).supports_4bit:
            adapted(tiny_llama_dir, method, quantize="4bit")  # accepted (the model here is float; only settings are read)


@pytest.mark.parametrize("method", METHODS)
def test_method_file_states_paper_equation_and_defaults(method):
    import inspect
    import re

    m = get_method(method)
    arxiv = re.search(r"arXiv:\d{4}\.\d{5}", m.paper)
    assert arxiv, m.paper
    doc = inspect.getmodule(m.build_layer if method not in ("lora-plus", "lora-pro") else m.build_optimizer).__doc__
    assert arxiv.group(0) in doc and "Defaults" in doc and "=" in doc  # the paper, its defaults, an equation
    defaults = doc[doc.index("Defaults") :]
    lr = m.defaults["lr"]
    assert f"rank {m.defaults['rank']}" in defaults, f"{method}: default rank undocumented"
    assert f"lr {lr:.0e}".replace("e-0", "e-") in defaults, f"{method}: default lr undocumented"


def test_no_method_is_named_outside_methods():
    """What the rest of the package needs to know about a method is an attribute of Method (the
    default method's name, `lora`, is also the config default and GGUF's adapter type)."""
    from pathlib import Path

    import lora_studio
    from lora_studio.config import TrainConfig

    root = Path(lora_studio.__file__).parent
    names = [n for n in REGISTRY if n != TrainConfig().method]
    found = [
        f"{path.relative_to(root)}: {name}"
        for path in root.rglob("*.py")
        if "methods" not in path.relative_to(root).parts
        for name in names
        if f'"{name}"' in path.read_text() or f"'{name}'" in path.read_text()
    ]
    assert found == []
