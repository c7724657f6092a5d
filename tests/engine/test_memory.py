"""The memory estimate against what autograd really keeps (saved-tensor hooks: deterministic,
no timing, no RSS), and its parameter and weight counts against the built model."""

from __future__ import annotations

import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.engine.memory import MB, NF4_BYTES_PER_PARAM, estimate, estimate_for_examples
from lora_studio.engine.plan import make_plan
from lora_studio.methods import count_parameters, get_method, inject_adapters, trainable_parameters
from lora_studio.models import load_model
from lora_studio.engine.loss import causal_lm_loss

BAND = 0.10  # the activation formula must land within ±10% of the measured saved bytes


def measured_saved_bytes(model, batch) -> int:
    """Bytes of the distinct tensors autograd saves for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, batch)
    return sum(storages.values())


def adapted_model(model_dir: str, cfg: TrainConfig):
    model = load_model(model_dir)
    torch.manual_seed(0)
    inject_adapters(model, get_method(cfg.method), cfg)
    model.train()
    return model


def full_batch(vocab: int, batch: int, length: int, trained_from: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :trained_from] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("rank,length", [(4, 48), (8, 96)])
def test_activation_estimate_matches_saved_tensors(tiny_model_dir, rank, length):
    # fp32: measured without autocast (auto would pick bf16 on a CPU where bf16 pays).
    cfg = TrainConfig(data="x", out="x", model=tiny_model_dir, rank=rank, batch_size=1, precision="fp32").resolved()
    model = adapted_model(tiny_model_dir, cfg)
    batch = full_batch(model.config.vocab_size, 1, length, trained_from=length // 2)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    measured = measured_saved_bytes(model, batch) - trained * hidden * 4  # minus the loss's d/dhidden (logits_mb)
    est = estimate(make_plan(cfg, "cpu"), seq_len=length, trained_tokens=trained, model=model)
    assert est.activations_mb * MB == pytest.approx(measured, rel=BAND)


def test_checkpointing_and_batch_move_the_estimate_the_right_way(tiny_llama_dir):
    def act(**kw):
        cfg = TrainConfig(data="x", out="x", model=tiny_llama_dir, rank=4, **kw)
        return estimate(make_plan(cfg, "cpu"), seq_len=64).activations_mb

    # 2 blocks: checkpointing keeps 2 block inputs + 1 block recomputed instead of 2 whole blocks.
    assert act(batch_size=8, gradient_checkpointing=True) < 0.6 * act(batch_size=8)
    assert act(batch_size=8) == pytest.approx(2 * act(batch_size=4), rel=0.05)
    assert act(batch_size=8, grad_accum_steps=2) == pytest.approx(act(batch_size=4), rel=1e-9)


def test_counts_come_from_the_model_without_loading_weights(tiny_model_dir):
    cfg = TrainConfig(data="x", out="x", model=tiny_model_dir, rank=8).resolved()
    est = estimate(make_plan(cfg, "cpu"))  # built on the meta device
    model = adapted_model(tiny_model_dir, cfg)
    trainable, total = count_parameters(model)
    assert (est.trainable_params, est.total_params) == (trainable, total)
    frozen = {id(p) for p in trainable_parameters(model).values()}
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in frozen)
    assert est.weights_mb * MB == pytest.approx(frozen_bytes)
    assert est.adapter_mb * MB == trainable * 4 and est.optimizer_mb == 2 * est.adapter_mb
    assert est.total_mb == pytest.approx(
        est.weights_mb + 4 * est.adapter_mb + est.activations_mb + est.logits_mb + est.workspace_mb + est.runtime_mb
    )


def test_four_bit_weights_are_counted_at_nf4_size(tiny_llama_dir):
    cfg = TrainConfig(data="x", out="x", model=tiny_llama_dir, rank=4)
    full = estimate(make_plan(cfg, "cpu"))
    nf4 = estimate(make_plan(TrainConfig(**{**cfg.to_dict(), "quantize": "4bit"}), "cpu"))
    model = adapted_model(tiny_llama_dir, cfg.resolved())
    from lora_studio.methods import adapter_layers

    quantized = sum(layer.in_features * layer.out_features for layer in adapter_layers(model).values())
    expected = full.weights_mb * MB - quantized * 4 + quantized * NF4_BYTES_PER_PARAM
    assert nf4.weights_mb * MB == pytest.approx(expected)


def test_estimate_for_examples_takes_the_longest_micro_batch(tiny_llama_dir):
    from lora_studio.data import Example

    cfg = TrainConfig(data="x", out="x", model=tiny_llama_dir, rank=4, batch_size=2, precision="fp32").resolved()
    examples = [Example([1] * n, [-100] * (n - 3) + [5, 5, 5]) for n in (10, 40, 25, 38)]
    model = adapted_model(tiny_llama_dir, cfg)
    est = estimate_for_examples(make_plan(cfg, "cpu"), model, examples)
    assert (est.micro_batch, est.seq_len) == (2, 40)
    # 3 trained tokens in each of the 2 longest: one chunk of 6 fp32 logit rows, and d/dhidden for the 6.
    assert est.logits_mb * MB == 6 * model.config.vocab_size * 4 + 6 * model.config.hidden_size * 4
    # bf16 autocast: the chunk's bf16 logits are copied to fp32 (2 + 4 bytes a logit).
    bf16 = TrainConfig(**{**cfg.to_dict(), "precision": "bf16"})
    est = estimate_for_examples(make_plan(bf16, "cpu"), model, examples)
    assert est.logits_mb * MB == 6 * model.config.vocab_size * 6 + 6 * model.config.hidden_size * 4


@pytest.mark.slow
def test_activation_estimate_on_the_bundled_model():
    cfg = TrainConfig(data="x", out="x", model="bundled", batch_size=2, precision="fp32").resolved()
    model = adapted_model("bundled", cfg)
    batch = full_batch(model.config.vocab_size, 2, 96, trained_from=64)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    measured = measured_saved_bytes(model, batch) - trained * model.config.hidden_size * 4  # minus d/dhidden
    est = estimate(make_plan(cfg, "cpu"), seq_len=96, trained_tokens=trained, model=model)
    # The padding mask term (batch > 1) is absent here: no padding in this batch.
    assert est.activations_mb * MB - 2 * 96 * 96 == pytest.approx(measured, rel=BAND)


def test_per_rank_estimate_for_ddp_and_fsdp(tiny_llama_dir):
    from lora_studio.engine.memory import pick_strategy

    cfg = TrainConfig(model=tiny_llama_dir, rank=4, batch_size=8, max_seq_len=64, precision="fp32")
    two = make_plan(cfg, "cpu", 2)
    one = estimate(make_plan(cfg, "cpu"))
    ddp = estimate(two, strategy="ddp")
    fsdp = estimate(two, strategy="fsdp")
    assert (one.strategy, ddp.strategy, fsdp.strategy) == ("single", "ddp", "fsdp")
    # DDP: every rank holds everything; only the batch is split
    assert ddp.weights_mb == one.weights_mb and ddp.optimizer_mb == one.optimizer_mb
    assert ddp.micro_batch == one.micro_batch // 2 == fsdp.micro_batch
    # FSDP: weights, adapter, gradients and optimizer state halved, plus the gathered blocks and root
    model = load_model(tiny_llama_dir)
    root = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." not in n)
    block = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers.0." in n)
    assert fsdp.weights_mb == pytest.approx(one.weights_mb / 2)
    assert fsdp.adapter_mb == pytest.approx(one.adapter_mb / 2) and fsdp.optimizer_mb == pytest.approx(one.optimizer_mb / 2)
    assert fsdp.gathered_mb * MB == pytest.approx((2 * block + root) / 2, rel=1e-6)
    assert "per rank of 2 (FSDP)" in fsdp.summary()
    # auto: DDP while the per-rank DDP estimate fits one device, FSDP past it; never for a refused method
    assert pick_strategy(two, capacity_mb=1e6) == "ddp"
    assert pick_strategy(two, capacity_mb=ddp.total_mb - 1) == "fsdp"
    pro = TrainConfig(model=tiny_llama_dir, method="lora-pro", rank=4)
    assert pick_strategy(make_plan(pro, "cpu", 2), capacity_mb=1.0) == "ddp"
    assert pick_strategy(make_plan(cfg, "cpu"), capacity_mb=1.0) == "single"


def test_the_plan_decides_the_strategy(tiny_llama_dir):
    # [FSDP hook 0]: make_plan decides `auto` (per-rank capacity) and refuses fsdp where it cannot work
    cfg = TrainConfig(model=tiny_llama_dir, rank=4, batch_size=8, max_seq_len=64, precision="fp32")
    need = estimate(make_plan(cfg, "cpu", 2), strategy="ddp").total_mb
    assert make_plan(cfg, "cpu").strategy == "single" and not make_plan(cfg, "cpu").sharded
    assert make_plan(cfg, "cpu", 2, capacity_mb=need + 1).strategy == "ddp"
    assert make_plan(cfg, "cpu", 2, capacity_mb=need - 1).sharded
    asked = TrainConfig(**{**cfg.to_dict(), "strategy": "fsdp"})
    assert make_plan(asked, "cpu", 2, capacity_mb=1e6).strategy == "fsdp"
    assert make_plan(asked, "cpu").strategy == "single"  # one process ignores it
    with pytest.raises(ValueError, match="LoRA-Pro cannot train with --strategy fsdp"):
        make_plan(TrainConfig(model=tiny_llama_dir, method="lora-pro", strategy="fsdp"), "cpu", 2)


def test_preflight_per_rank(tiny_llama_dir):
    from lora_studio.preflight import preflight

    cfg = TrainConfig(model=tiny_llama_dir, rank=4, batch_size=8, max_seq_len=64, precision="fp32", strategy="ddp")
    need = estimate(make_plan(cfg, "cpu", 2), strategy="ddp").total_mb
    with pytest.raises(ValueError, match="per rank.*--strategy fsdp"):
        preflight(cfg, memory_mb=2 * need - 2, world=2)
    with pytest.raises(ValueError, match="LoRA-Pro cannot train with --strategy fsdp"):
        preflight(TrainConfig(model=tiny_llama_dir, method="lora-pro", strategy="fsdp"), world=2)
    assert preflight(TrainConfig(model=tiny_llama_dir, rank=4, strategy="fsdp"), world=2).strategy == "fsdp"
