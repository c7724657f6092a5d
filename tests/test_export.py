"""Exports: the Hub push uploads the adapter with its card and never writes or echoes the token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_studio import cards, export
from tests.conftest import format_rows, write_jsonl


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    from lora_studio.config import TrainConfig
    from lora_studio.engine.run import train

    root = tmp_path_factory.mktemp("export")
    data = write_jsonl(root / "answers.jsonl", format_rows(8))
    status = train(TrainConfig(data=str(data), out=str(root / "run"), model=tiny_llama_dir, rank=4, batch_size=4, max_steps=3))
    assert status["state"] == "done"
    return root / "run"


class FakeHub:
    """Records what would be sent to the Hub; optionally fails like a real client, echoing the token."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if self.fail:
            raise RuntimeError(f"401 Unauthorized for token {kwargs['token']}")
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        self.uploaded = {p.name: p.read_bytes() for p in folder.iterdir()}


def test_push_uploads_the_adapter_and_its_card(run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub = FakeHub()
    url = export.push_to_hub(run_dir, "me/tiny-lora", "hf_typed", kind="adapter", private=True, api=hub)
    assert url == "https://huggingface.co/me/tiny-lora"
    (_, create), (_, upload) = hub.calls
    assert create == {"repo_id": "me/tiny-lora", "token": "hf_typed", "private": True, "exist_ok": True}
    assert upload["repo_id"] == "me/tiny-lora" and upload["token"] == "hf_typed"
    assert set(hub.uploaded) == {"adapter_config.json", "adapter_model.safetensors", "lora_studio.json", "README.md"}
    assert hub.uploaded["adapter_model.safetensors"] == (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    card = hub.uploaded["README.md"].decode()
    assert "# me/tiny-lora" in card and 'PeftModel.from_pretrained(base, "me/tiny-lora")' in card
    assert not any(b"hf_typed" in content for content in hub.uploaded.values())


def test_push_falls_back_to_hf_token_and_scrubs_it_from_errors(run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fromENV123")
    hub = FakeHub(fail=True)
    with pytest.raises(export.HubError) as info:
        export.push_to_hub(run_dir, "me/x", "", api=hub)
    assert hub.calls[0][1]["token"] == "hf_fromENV123"
    assert "hf_fromENV123" not in str(info.value) and "***" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("repo", ["", "noslash", "a/b/c", "me/has space"])
def test_push_refuses_bad_repo_names(run_dir, repo):
    with pytest.raises(ValueError, match="user/name"):
        export.push_to_hub(run_dir, repo, "hf_x", api=FakeHub())


def test_push_without_any_token_says_so(run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ValueError, match="no Hub token"):
        export.push_to_hub(run_dir, "me/x", "  ", api=FakeHub())


def test_card_reports_the_runs_own_figures(run_dir):
    card = cards.model_card(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert f"| first / final train loss | {rows[0]['loss']:.4g} / {rows[-1]['loss']:.4g} |" in card
    assert f"| steps | {len(rows)} of {len(rows)} |" in card and "`answers.jsonl`" in card
    assert "base_model:" not in card  # a local folder is not a Hub id: no broken link in the front matter
    assert "| method | lora |" in card


# ---------------------------------------------------------------- headless export (CLI = Export tab's functions)


def test_cli_export_adapter_folder_and_zip(run_dir, tmp_path):
    import zipfile

    from lora_studio.cli import main

    assert main(["export", "--run", str(run_dir), "--format", "adapter", "--out", str(tmp_path / "a")]) == 0
    assert {p.name for p in (tmp_path / "a").iterdir()} == {*export.ADAPTER_FILES, "README.md"}
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(["export", "--run", str(run_dir), "--format", "adapter", "--out", str(tmp_path / "x.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "x.zip") as zf:  # the same zip the Export tab offers
        assert sorted(zf.namelist()) == sorted(f"run-adapter/{n}" for n in [*export.ADAPTER_FILES, "README.md"])


def test_cli_export_merged_answers_like_the_tuned_model(run_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from lora_studio.cli import main
    from lora_studio.compare import TunedModel

    assert main(["export", "--run", str(run_dir), "--format", "merged", "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    tuned = TunedModel(run_dir, device="cpu")
    ids = tuned.messages_ids([{"role": "user", "content": "Say the word fox"}])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_cli_export_gguf_round_trips_to_the_merged_models_replies(run_dir, tmp_path, capsys):
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from lora_studio.cli import main
    from tests.test_gguf import agreement, greedy, rounded

    record = json.loads((run_dir / "adapter" / "lora_studio.json").read_text())
    merged, tokenizer, _ = export.load_merged(run_dir)
    prompts = ["Say the word fox", "Say the word Paris", "hello"]
    for quant in ("f16", "q8_0"):
        out = tmp_path / quant
        assert main(["export", "--run", str(run_dir), "--format", "gguf", "--quant", quant, "--out", str(out)]) == 0
        path = out / f"run.{quant}.gguf"
        assert {p.name for p in out.iterdir()} == {path.name, "Modelfile", "README.md"}
        assert GGUFReader(str(path)).fields["tokenizer.chat_template"].contents() == record["chat_template"]
        modelfile = (out / "Modelfile").read_text()
        assert modelfile.startswith(f"FROM ./{path.name}\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
        assert f"ollama create run -f Modelfile" in (out / "README.md").read_text()
        back = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
        reference = rounded(merged, torch.float16) if quant == "f16" else merged
        same = total = 0
        for prompt in prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            want, got = greedy(reference, ids), greedy(back, ids)
            if quant == "f16":
                assert got == want, prompt
            same += round(agreement(want, got) * len(want))
            total += len(want)
        with capsys.disabled():
            print(f"\n[gguf {quant}, tiny llama LoRA run] greedy agreement with the merged model: {same}/{total} = {same / total:.1%}")
        assert same / total >= (1.0 if quant == "f16" else 0.7)


def test_cli_export_gguf_refuses_an_unsupported_family_before_loading(tiny_gpt2_dir, tmp_path, capsys):
    from lora_studio.cli import main
    from lora_studio.config import TrainConfig
    from lora_studio.engine.run import train

    data = write_jsonl(tmp_path / "d.jsonl", format_rows(4))
    assert train(TrainConfig(data=str(data), out=str(tmp_path / "g"), model=tiny_gpt2_dir, rank=2, batch_size=4, max_steps=1))["state"] == "done"
    assert main(["export", "--run", str(tmp_path / "g"), "--format", "gguf", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3" in err and "'gpt2'" in err
    assert not (tmp_path / "o").exists()


def test_cli_push_uses_hf_token_and_never_prints_it(run_dir, monkeypatch, capsys):
    from lora_studio.cli import main

    hub = FakeHub(fail=True)
    monkeypatch.setenv("HF_TOKEN", "hf_operatorSECRET")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: hub)
    assert main(["push", "--run", str(run_dir), "--repo", "me/tiny"]) == 2
    assert hub.calls[0][1]["token"] == "hf_operatorSECRET" and hub.calls[0][1]["private"] is True
    out = capsys.readouterr()
    assert "hf_operatorSECRET" not in out.out + out.err and "push to me/tiny failed" in out.err
    hub.fail = False
    assert main(["push", "--run", str(run_dir), "--repo", "me/tiny", "--public"]) == 0
    assert "pushed the adapter to https://huggingface.co/me/tiny" in capsys.readouterr().out
    assert hub.calls[-2][1]["private"] is False and "adapter_model.safetensors" in hub.uploaded


# ---------------------------------------------------------------- GGUF LoRA adapter


def _with_random_adapter(run_dir: Path, dest: Path) -> Path:
    """A copy of the run whose A and B are random and large: a few training steps leave B near
    zero, and an adapter that changes nothing could not fail the comparison below."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(run_dir, dest)
    path = dest / "adapter" / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dest


def _check_gguf_lora_against_merge(run: Path, tmp_path: Path, expected_rank: int) -> None:
    """The adapter file as llama.cpp reads it: the right metadata, every `X.lora_a/.lora_b` pair named
    after a tensor X of the base GGUF with shapes llama.cpp's loader accepts, and base (from the
    base GGUF, f16) + alpha/rank · B·A equal to our own merged weight, in the GGUF's layout."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from lora_studio import gguf_export
    from lora_studio.cli import main
    from lora_studio.models import load_tokenizer, resolve_model_path

    record = json.loads((run / "adapter" / "lora_studio.json").read_text())
    spec = record.get("base_model") or record["settings"]["model"]
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec), dtype=torch.float32)
    base_path = gguf_export.write_gguf(base, load_tokenizer(spec), tmp_path / "base.f16.gguf", "f16")
    assert main(["export", "--run", str(run), "--format", "gguf-lora", "--quant", "f16", "--out", str(tmp_path / "l")]) == 0
    path = tmp_path / "l" / f"{run.name}-lora.f16.gguf"
    assert {p.name for p in (tmp_path / "l").iterdir()} == {path.name, "README.md"}
    assert "not run in a llama.cpp binary" in (tmp_path / "l" / "README.md").read_text()

    adapter, base_file = GGUFReader(str(path)), GGUFReader(str(base_path))
    value = lambda r, key: r.fields[key].contents()  # noqa: E731
    assert value(adapter, "general.type") == "adapter" and value(adapter, "adapter.type") == "lora"
    assert value(adapter, "general.architecture") == value(base_file, "general.architecture") == "llama"
    alpha = value(adapter, "adapter.lora.alpha")
    assert adapter.fields["adapter.lora.alpha"].types[0].name == "FLOAT32"  # llama.cpp reads it as f32

    base_tensors = {t.name: t for t in base_file.tensors}
    ab = {t.name: t for t in adapter.tensors}
    names = {n.rsplit(".", 1)[0] for n in ab}
    assert ab and all(n.endswith((".lora_a", ".lora_b")) for n in ab)
    assert len(ab) == 2 * len(names) == 2 * len(record["modules"])
    assert names <= set(base_tensors), names - set(base_tensors)

    merged, _, _ = export.load_merged(run)
    merged_state = merged.state_dict()
    plan = dict(gguf_export._tensor_plan(merged, "llama"))
    for name in sorted(names):
        a, b, w = ab[f"{name}.lora_a"], ab[f"{name}.lora_b"], base_tensors[name]
        # llama-adapter.cpp's checks, in ggml's ne order: a = [in, rank], b = [rank, out], base = [in, out]
        assert int(a.shape[0]) == int(w.shape[0]) and int(b.shape[1]) == int(w.shape[1])
        assert int(a.shape[1]) == int(b.shape[0]) == expected_rank
        rank = int(b.shape[0])  # what llama.cpp divides alpha by
        A = torch.from_numpy(a.data.astype("float32"))  # numpy order: (rank, in)
        B = torch.from_numpy(b.data.astype("float32"))  # (out, rank)
        W = torch.from_numpy(w.data.astype("float32"))  # (out, in)
        applied = W + (alpha / rank) * (B @ A)
        want = gguf_export._prepare(merged_state[plan[name]], name, merged.config, "llama")
        assert (want - W).abs().max() > 0.05  # the adapter moves this weight far beyond the tolerance
        torch.testing.assert_close(applied, want, rtol=2e-3, atol=2e-3, msg=name)


def test_gguf_lora_of_a_lora_run_applies_to_the_base_gguf_as_our_merge(run_dir, tmp_path):
    run = _with_random_adapter(run_dir, tmp_path / "run")
    _check_gguf_lora_against_merge(run, tmp_path, expected_rank=4)


def test_gguf_lora_of_a_delta_lora_run_is_its_rank_2r_export(tiny_llama_dir, tmp_path):
    from lora_studio.config import TrainConfig
    from lora_studio.engine.run import train

    data = write_jsonl(tmp_path / "d.jsonl", format_rows(8))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "dl"), model=tiny_llama_dir, method="delta-lora", rank=2,
                      batch_size=4, max_steps=3, method_options={"start_step": 1})  # fmt: skip
    assert train(cfg)["state"] == "done"
    run = _with_random_adapter(tmp_path / "dl", tmp_path / "run")
    _check_gguf_lora_against_merge(run, tmp_path, expected_rank=4)


@pytest.mark.parametrize("method", ["dora", "vera"])
def test_gguf_lora_refuses_methods_llama_cpp_cannot_apply(method, tiny_llama_dir, tmp_path, capsys):
    from lora_studio.cli import main
    from lora_studio.config import TrainConfig
    from lora_studio.engine.run import train

    data = write_jsonl(tmp_path / "d.jsonl", format_rows(4))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "r"), model=tiny_llama_dir, method=method, rank=2, batch_size=4, max_steps=1)
    assert train(cfg)["state"] == "done"
    assert main(["export", "--run", str(tmp_path / "r"), "--format", "gguf-lora", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"'{method}'" in err and "--format gguf" in err and "merged GGUF" in err
    assert not (tmp_path / "o").exists()
