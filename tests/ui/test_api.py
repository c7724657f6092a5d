"""The launched app through gradio_client: every answer checked against the engine itself
(TunedModel with the adapter off/on, peft loading the exported zip), not against itself."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import pytest
import torch

from lora_studio.compare import GenerationSettings, TunedModel
from tests.helpers import logits, sample_ids

GREEDY = dict(temperature=0.0, top_p=1.0, max_tokens=12)


def text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


@pytest.fixture(scope="module")
def oracle(done_run):
    return TunedModel(done_run, device="cpu")


def expected(oracle: TunedModel, prompt: str, tuned: bool) -> str:
    return oracle.reply(prompt, tuned=tuned, settings=GenerationSettings(max_new_tokens=GREEDY["max_tokens"]))


def test_chat_streams_base_then_tuned_replies(client, done_run, oracle):
    prompt = "Say the word Paris"
    job = client.submit(done_run.name, prompt, [], [], *GREEDY.values(), api_name="/chat")
    message, base, tuned = job.result(timeout=120)
    assert message == ""
    assert [m["role"] for m in base] == ["user", "assistant"] == [m["role"] for m in tuned]
    assert text_of(base[0]) == prompt
    base_reply, tuned_reply = text_of(base[1]), text_of(tuned[1])
    assert base_reply == expected(oracle, prompt, tuned=False)
    assert tuned_reply == expected(oracle, prompt, tuned=True)
    assert base_reply != tuned_reply, "the adapter must change the reply (else the toggle is untested)"
    # Streamed: the page got the replies piece by piece, not in one final update.
    assert len(job.outputs()) > 4


def test_chat_keeps_each_sides_conversation(client, done_run):
    _, base, tuned = client.predict(done_run.name, "hello", [], [], *GREEDY.values(), api_name="/chat")
    _, base2, tuned2 = client.predict(done_run.name, "world", base, tuned, *GREEDY.values(), api_name="/chat")
    assert [text_of(m) for m in base2[:2]] == [text_of(m) for m in base]
    assert [text_of(m) for m in tuned2[:2]] == [text_of(m) for m in tuned]
    assert len(base2) == len(tuned2) == 4 and text_of(base2[2]) == "world"


def test_chat_refuses_a_path_as_run_id(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="not a run id"):
        client.predict("../../etc", "hi", [], [], *GREEDY.values(), api_name="/chat")


def test_blind_vote_reveals_the_side_and_keeps_a_tally(client, done_run, oracle):
    votes = done_run / "votes.json"
    votes.unlink(missing_ok=True)
    a, b, question = client.predict(done_run.name, "Say the word fox", *GREEDY.values(), api_name="/blind_ask")
    replies = {expected(oracle, "Say the word fox", tuned=False), expected(oracle, "Say the word fox", tuned=True)}
    assert {a, b} == replies and "better" in question
    verdict, tally = client.predict(done_run.name, api_name="/vote_a")
    tuned_was_a = "Model A was the **tuned**" in verdict
    assert tuned_was_a == (a == expected(oracle, "Say the word fox", tuned=True))
    counts = json.loads(votes.read_text())
    assert counts == {"tuned": int(tuned_was_a), "base": int(not tuned_was_a), "tie": 0}
    assert "1 vote(s)" in tally
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Ask a prompt first"):  # one vote per answer pair
        client.predict(done_run.name, api_name="/vote_b")
    assert json.loads(votes.read_text()) == counts


def test_batch_table_and_csv(client, done_run, oracle, tmp_path):
    from gradio_client import handle_file

    prompts = ["Say the word dog", "Say the word tiny", "hello world"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    table, csv_path = client.predict(
        done_run.name, handle_file(str(path)), "upload", *GREEDY.values(), api_name="/batch"
    )
    assert table["headers"] == ["prompt", "base", "tuned"]
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["prompt"] for r in rows] == prompts
    for row, table_row in zip(rows, table["data"]):
        assert row["base"] == expected(oracle, row["prompt"], tuned=False)
        assert row["tuned"] == expected(oracle, row["prompt"], tuned=True)
        assert table_row == [row["prompt"], row["base"], row["tuned"]]


def test_adapter_zip_loads_in_peft_with_our_logits(client, done_run, tiny_llama_dir, tmp_path, oracle):
    peft = pytest.importorskip("peft")
    from lora_studio.models import load_model

    path = client.predict(done_run.name, api_name="/export_zip")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path)
    folder = tmp_path / f"{done_run.name}-adapter"
    assert {f"{done_run.name}-adapter/{n}" for n in ("adapter_config.json", "adapter_model.safetensors", "README.md")} <= names
    ref = peft.PeftModel.from_pretrained(load_model(tiny_llama_dir), str(folder))
    ids = sample_ids(ref.config.vocab_size)
    torch.testing.assert_close(logits(ref, ids), logits(oracle.model, ids), atol=1e-5, rtol=1e-5)
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "LoRA" in card


def test_merged_model_matches_the_adapter(client, done_run, oracle):
    from lora_studio.models import load_model

    note, offered = client.predict(done_run.name, False, api_name="/export_merged")
    assert str(done_run / "merged") in note and offered is None
    merged = load_model(str(done_run / "merged"))
    ids = sample_ids(merged.config.vocab_size)
    torch.testing.assert_close(logits(merged, ids), logits(oracle.model, ids), atol=1e-5, rtol=1e-5)


def test_push_never_echoes_the_token(client, done_run, app):
    secret = "hf_plantedSECRET0123456789abcdef"
    token_field, message = client.predict(done_run.name, "someone/tiny", secret, "adapter", True, api_name="/push_to_hub")
    assert token_field == ""  # the field is emptied: the token is not sent back to the page
    assert "Push failed" in message  # offline: the Hub cannot be reached
    assert secret not in message and secret not in app.log_text()
    token_field, message = client.predict(done_run.name, "someone/tiny", "", "adapter", True, api_name="/push_to_hub")
    assert "no Hub token" in message  # HF_TOKEN is unset for the launched app
    assert not any(secret in p.read_text(errors="ignore") for p in done_run.rglob("*") if p.is_file() and p.suffix != ".safetensors")


def test_no_run_history_keeps_inputs_in_the_browser(app):
    """Gradio's run history would store each call's inputs (a typed Hub token too) in the browser."""
    import urllib.request

    with urllib.request.urlopen(app.url + "config", timeout=10) as response:
        config = json.loads(response.read())
    assert config["run_history"] is False


def test_model_card_records_method_data_settings_and_metrics(client, done_run):
    card = client.predict(done_run.name, api_name="/model_card")
    rows = [json.loads(line) for line in (done_run / "metrics.jsonl").read_text().splitlines()]
    assert f"| steps | {len(rows)} of {len(rows)} |" in card
    assert f"{rows[-1]['loss']:.4g}" in card
    assert "| rank | 4 |" in card and "| lr | 0.01 |" in card
    assert f"`{done_run.name}.jsonl`" in card


def test_batch_on_the_runs_validation_rows(client, ui_runs_dir, tiny_llama_dir):
    """The rows the trainer held out (val_fraction, seed), answered, with their references."""
    import random

    from lora_studio.config import TrainConfig
    from lora_studio.engine.run import train
    from tests.conftest import format_rows, write_jsonl

    rows = [{**r, "instruction": f"{r['instruction']} ({i})"} for i, r in enumerate(format_rows(16))]
    data = write_jsonl(ui_runs_dir.parent / "val.jsonl", rows)
    out = ui_runs_dir / "tiny-val"
    cfg = TrainConfig(data=str(data), out=str(out), model=tiny_llama_dir, rank=4, batch_size=4, max_steps=2, val_fraction=0.25, seed=3)
    assert train(cfg)["state"] == "done"
    table, csv_path = client.predict("tiny-val", None, "validation", *GREEDY.values(), api_name="/batch")
    held = sorted(random.Random(3).sample(range(16), 4))  # the split rule of data.split_examples
    assert table["headers"] == ["prompt", "reference", "base", "tuned"]
    assert [r[:2] for r in table["data"]] == [[rows[i]["instruction"], rows[i]["output"]] for i in held]


def test_score_button_scores_base_and_tuned_against_references(client, done_run, oracle, tmp_path):
    from gradio_client import handle_file

    from lora_studio.scoring import rouge_l
    from tests.conftest import format_rows, write_jsonl

    path = write_jsonl(tmp_path / "refs.jsonl", format_rows(3))
    summary, table = client.predict(done_run.name, handle_file(str(path)), "upload", *GREEDY.values(), api_name="/score")
    assert table["headers"] == ["prompt", "reference", "base", "tuned", "tuned ROUGE-L"]
    for row in table["data"]:
        assert row[2] == expected(oracle, row[0], tuned=False) and row[3] == expected(oracle, row[0], tuned=True)
        assert row[4] == pytest.approx(rouge_l(row[3], row[1]), abs=1e-3)
    mean = sum(rouge_l(r[3], r[1]) for r in table["data"]) / 3
    assert f"| tuned |" in summary and f"{mean:.3f} |" in summary.split("| tuned |")[1]


def test_gguf_button_builds_the_file_modelfile_and_readme(client, done_run, oracle):
    from gguf import GGUFReader

    note, offered = client.predict(done_run.name, "q8_0", api_name="/export_gguf")
    names = sorted(Path(p).name for p in offered)
    assert names == sorted([f"{done_run.name}.q8_0.gguf", "Modelfile", "README.md"]) and "MiB" in note
    path = done_run / "gguf" / f"{done_run.name}.q8_0.gguf"  # kept in the run folder too
    fields = GGUFReader(str(path)).fields
    assert fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    assert fields["tokenizer.chat_template"].contents() == oracle.tokenizer.chat_template
    modelfile = next(Path(p) for p in offered if Path(p).name == "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{path.name}")
