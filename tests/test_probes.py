"""Probe prompts and early stopping: the tracker by itself, probe answers against plain greedy
decoding, probes written at each evaluation of a run, and a run built to overfit stopping early
with the best evaluation's adapter kept."""

from __future__ import annotations

import json

import pytest
import torch

from lora_studio.adapters import read_adapter_record
from lora_studio.cli import main
from lora_studio.compare import GenerationSettings, TunedModel
from lora_studio.config import TrainConfig
from lora_studio.models import load_model, load_tokenizer
from lora_studio.probes import EarlyStopper, answer_probes, read_probes
from tests.conftest import format_rows, write_jsonl


def test_early_stopper_counts_evaluations_without_improvement():
    s = EarlyStopper(patience=2)
    assert [s.update(v, step) for step, v in enumerate([3.0, 2.0, 2.5, 1.5, 1.6, 1.5], start=1)] == [
        False, False, False, False, False, True]  # fmt: skip
    assert (s.best, s.best_step) == (1.5, 4)  # an equal value is no improvement
    up = EarlyStopper(patience=1, mode="max", min_delta=0.1)
    assert not up.update(0.2, 10) and not up.update(0.35, 20) and up.update(0.4, 30)  # +0.05 < min_delta
    assert up.best_step == 20
    nan = EarlyStopper(patience=1)
    assert nan.update(float("nan"), 1) and nan.best is None  # a NaN loss never counts as best
    with pytest.raises(ValueError, match="patience"):
        EarlyStopper(0)


def test_answer_probes_are_greedy_and_keep_the_training_mode(tiny_llama_dir):
    tok, model = load_tokenizer(tiny_llama_dir), load_model(tiny_llama_dir)
    model.train()
    prompts = ["Say the word fox", "hello"]
    replies = answer_probes(model, tok, prompts, GenerationSettings(max_new_tokens=5))
    assert model.training
    model.eval()
    for prompt, reply in zip(prompts, replies):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert reply == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_config_refuses_early_stop_with_nothing_to_watch():
    with pytest.raises(ValueError, match="early_stop needs"):
        TrainConfig(data="x", early_stop=2).resolved()
    with pytest.raises(ValueError, match="probes"):
        TrainConfig(data="x", probes=[" "]).resolved()


def test_probes_written_at_each_evaluation(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", format_rows(16))
    (tmp_path / "probes.txt").write_text("Say the word dog\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--model", tiny_llama_dir, "--epochs", "2", "--max-steps", "5",
                 "--batch-size", "4", "--eval-every", "2", "--probe", "Say the word fox", "--probes",
                 str(tmp_path / "probes.txt"), "--probe-max-new-tokens", "4", "--checkpoint-every", "0"]) == 0
    rows = read_probes(run)
    assert [(r["step"], r["prompt"]) for r in rows] == [
        (s, p) for s in (2, 4, 5) for p in ("Say the word fox", "Say the word dog")]  # fmt: skip
    assert all(isinstance(r["reply"], str) for r in rows)
    assert json.loads((run / "config.json").read_text())["probes"] == ["Say the word fox", "Say the word dog"]


def _val_loss(run, val_file) -> float:
    from lora_studio.data import collate, load_examples
    from lora_studio.engine.loss import causal_lm_loss

    tm = TunedModel(run)
    examples, _ = load_examples(str(val_file), tm.tokenizer, max_seq_len=512)
    batch = collate(examples, tm.tokenizer.pad_token_id)
    with torch.no_grad():
        loss, n = causal_lm_loss(tm.model, batch)
    return float(loss) / n


def test_early_stop_on_a_run_built_to_overfit(tmp_path, tiny_llama_dir):
    # validation answers contradict the training answers: the more it fits, the worse the eval loss
    train = write_jsonl(tmp_path / "train.jsonl", format_rows(8))
    val = write_jsonl(tmp_path / "val.jsonl", [{**r, "output": f"{r['output'].split()[1]} is it"} for r in format_rows(8)])
    run = tmp_path / "run"
    assert main(["train", "--data", str(train), "--val-data", str(val), "--out", str(run), "--model", tiny_llama_dir,
                 "--epochs", "40", "--max-steps", "40", "--batch-size", "8", "--lr", "3e-2", "--warmup-ratio", "0", "--eval-every", "1",
                 "--early-stop", "2", "--checkpoint-every", "0", "--precision", "fp32"]) == 0
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and status["step"] < 40, status
    assert status["step"] == status["best_step"] + 2  # two evaluations without improvement after the best
    assert f"early stop at step {status['step']}" in status["stop_reason"] and f"step {status['best_step']}" in status["stop_reason"]
    evals = {json.loads(x)["step"]: json.loads(x)["eval_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()}
    assert status["best_value"] == min(evals.values()) == evals[status["best_step"]]
    assert read_adapter_record(run / "adapter")["step"] == status["best_step"]
    assert _val_loss(run, val) == pytest.approx(status["best_value"], rel=1e-4)  # the saved weights are the best ones


def test_early_stop_on_a_test_file_watches_the_rouge_of_greedy_replies(tmp_path, tiny_llama_dir):
    import contextlib

    from lora_studio.methods import get_method, inject_adapters
    from lora_studio.probes import EvalWatch
    from lora_studio.scoring import rouge_l

    test = write_jsonl(tmp_path / "test.jsonl", format_rows(3))
    cfg = TrainConfig(data="x", model=tiny_llama_dir, early_stop=1, test_data=str(test), probe_max_new_tokens=4,
                      probes=["hello"]).resolved()  # fmt: skip
    tok, model = load_tokenizer(tiny_llama_dir), load_model(tiny_llama_dir)
    method = get_method("lora")
    inject_adapters(model, method, cfg)
    watch = EvalWatch(cfg, tmp_path, model, tok, method, contextlib.nullcontext)
    assert watch.metric == "rougeL" and watch.stopper.mode == "max"
    row: dict = {"eval_loss": 1.0}
    assert not watch.after_eval(2, row)
    replies = answer_probes(model, tok, [f"Say the word {w}" for w in ("Paris", "hello", "world")], GenerationSettings(max_new_tokens=4))
    refs = [f"ANSWER: {w}" for w in ("Paris", "hello", "world")]
    assert row["test_rougeL"] == pytest.approx(sum(rouge_l(a, r) for a, r in zip(replies, refs)) / 3)
    assert watch.after_eval(4, {})  # the same weights, the same ROUGE-L: no improvement, patience 1
    assert watch.stopper.best_step == 2 and "rougeL did not improve for 1" in watch.stop_reason(4)
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # training after the best evaluation: the restore must undo it
    assert watch.restore_best() == 2
    assert all(torch.equal(p, kept[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert [r["step"] for r in read_probes(tmp_path)] == [2, 4]


def test_a_fresh_start_clears_probe_answers_and_a_resume_keeps_those_up_to_its_step(tmp_path):
    from lora_studio.probes import EvalWatch

    cfg = TrainConfig(data="x")
    rows = [{"step": s, "prompt": "p", "reply": str(s)} for s in (2, 4, 6)]
    write_jsonl(tmp_path / "probes.jsonl", rows)
    EvalWatch(cfg, tmp_path, None, None, None, None, from_step=4)  # resumed from the step-4 checkpoint
    assert [r["step"] for r in read_probes(tmp_path)] == [2, 4]
    EvalWatch(cfg, tmp_path, None, None, None, None, from_step=0)  # a fresh start in the same folder
    assert read_probes(tmp_path) == []
