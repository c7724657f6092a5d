"""Data, Train and Runs through gradio_client against the launched app: what the page shows is
checked against the engine's own files and functions (metrics.jsonl, the training labels,
parameter counts), and training really runs in the runner's background process."""

from __future__ import annotations

import html
import json
import re

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests import soak
from tests.conftest import format_rows, write_jsonl
from tests.ui.conftest import ROOT, launch_app, stop_app

EXAMPLE = ROOT / "examples" / "json_answers.jsonl"


def settings(model: str, **over) -> list:
    """The Train tab's widgets, in the order of the /start endpoint."""
    from lora_studio.ui.train_tab import FIELDS

    values = dict(
        model=model, quantize=False, method="lora", rank=4, alpha=8, lr=1e-3, lr_ratio=1.0, epochs=30, batch_size=4,
        max_seq_len=128, dropout=0.0, max_steps=0, target="all-linear", seed=0, warmup_ratio=0.03, weight_decay=0.0,
        use_rslora=False, val_fraction=0.0, packing=False, drop_invalid=False, grad_accum_steps=1,
        gradient_checkpointing=False, precision="auto", checkpoint_every=10, eval_every=50, method_options="",
        trust_remote_code=False, probes="", early_stop=0, strategy="auto",
    )  # fmt: skip
    values.update(over)
    return [values[f] for f in FIELDS]


def inspect(client: Client, path, model: str, fmt: str = "auto", columns: str = "", max_len: int = 128):
    return client.predict(handle_file(str(path)), None, "", fmt, columns, "", model, max_len, api_name="/inspect_data")


def wait_status(client: Client, pattern: str, timeout: float = 120) -> str:
    return soak.wait_status(client, pattern, timeout)  # one poller for the tests and the soak script


def run_id_of(text: str) -> str:
    return re.match(r"\*\*(\S+): ", text).group(1)


@pytest.fixture
def session(app):
    return Client(app.url, verbose=False)  # a visitor of their own (own data choice, own view)


def test_validation_names_row_and_field(session, tiny_llama_dir, tmp_path):
    rows = format_rows(4)
    rows[1] = {"instruction": "Say the word dog", "input": ""}  # row 2 has no output
    path = write_jsonl(tmp_path / "broken.jsonl", rows)
    summary, problems, first_rows, samples, _ = inspect(session, path, tiny_llama_dir)
    assert "cannot train" in summary
    table = dict(zip(problems["headers"], zip(*problems["data"])))
    assert 2 in table["row"] and "output" in table["field"]
    assert first_rows["data"][0][:2] == [1, "Say the word Paris"]


def test_column_mapping_turns_an_unknown_csv_into_alpaca(session, tiny_llama_dir, tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nWhat is 2+2?,4\nCapital of France?,Paris\n")
    summary, *_ = inspect(session, path, tiny_llama_dir)
    assert "cannot train" in summary and "instruction=question,output=answer" in summary  # the hint
    summary, problems, *_ = inspect(session, path, tiny_llama_dir, fmt="alpaca", columns="instruction=question,output=answer")
    assert "ready to train" in summary and "format alpaca (as given)" in summary and problems["data"] == []


def test_preview_highlights_exactly_the_trained_tokens(session, tiny_llama_dir):
    from lora_studio.data import load_examples
    from lora_studio.models import load_tokenizer

    *_, samples, _ = inspect(session, EXAMPLE, tiny_llama_dir)
    first = samples.split('<div class="data-sample">')[1]
    trained = "".join(re.findall(r'<span class="token-trained"[^>]*>(.*?)</span>(?=<span class="token-|</pre>)', first, re.S))
    trained = html.unescape(re.sub(r"<[^>]+>", "", trained))
    tok = load_tokenizer(tiny_llama_dir)
    examples, _ = load_examples(str(EXAMPLE), tok, max_seq_len=128)
    labels = [t for t in examples[0].labels if t != -100]
    assert trained == tok.decode(labels, skip_special_tokens=False)
    assert trained.endswith(tok.eos_token) and "reply ends with a trained EOS" in first


def test_preflight_counts_the_trainable_parameters(session, tiny_llama_dir):
    from lora_studio.config import TrainConfig
    from lora_studio.methods import count_parameters, get_method, inject_adapters
    from lora_studio.models import load_model

    inspect(session, EXAMPLE, tiny_llama_dir)
    text = session.predict(*settings(tiny_llama_dir, rank=6), api_name="/preflight")
    model = load_model(tiny_llama_dir)
    inject_adapters(model, get_method("lora"), TrainConfig(model=tiny_llama_dir, rank=6).resolved())
    trainable, total = count_parameters(model)
    assert f"trainable parameters: **{trainable:,}** of {total:,}" in text
    assert "memory estimate" in text


def test_start_without_data_is_refused(session, tiny_llama_dir):
    with pytest.raises(AppError, match="Pick the training data"):
        session.predict(*settings(tiny_llama_dir), api_name="/start")


def test_train_watch_stop_resume_delete(session, app, tiny_llama_dir):
    inspect(session, EXAMPLE, tiny_llama_dir)
    text = session.predict(*settings(tiny_llama_dir), api_name="/start")[0]
    run_id = run_id_of(text)
    run_dir = app.runs_dir / run_id
    assert json.loads((run_dir / "config.json").read_text())["data"].endswith("json_answers.jsonl")
    text = wait_status(session, rf"{run_id}: training\*\*, step [1-9]")
    # The charts are the run's own metrics, read back from its folder.
    status, progress, loss, memory, lr, speed = session.predict(api_name="/attach")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    drawn = {(step, round(value, 6)) for step, value, series in loss["data"] if series == "train"}
    assert {(r["step"], round(r["loss"], 6)) for r in rows[: len(drawn)]} == drawn and len(drawn) >= 1
    assert {s for *_, s in memory["data"]} >= {"measured peak RSS"}
    assert re.search(r'data-step="\d+" data-total="\d+"', progress)
    with pytest.raises(AppError, match="stop it before deleting"):
        session.predict(run_id, [], api_name="/delete")

    session.predict(api_name="/stop")
    wait_status(session, rf"{run_id}: stopped\*\* at step \d+")
    stopped = json.loads((run_dir / "status.json").read_text())
    assert stopped["state"] == "stopped" and (run_dir / "adapter" / "adapter_config.json").exists()

    table = session.predict([], None, api_name="/runs")[0]
    row = dict(zip(table["headers"], next(r for r in table["data"] if r[0] == run_id)))
    assert row["state"] == "stopped" and row["method"] == "lora" and row["rank"] == 4
    assert row["final loss"] == round(stopped["loss"], 4)

    message = session.predict(run_id, api_name="/resume")[0]
    assert "resumes" in message
    wait_status(session, rf"{run_id}: training\*\*, step \d+")
    resumed = json.loads((run_dir / "status.json").read_text())
    assert resumed["step"] >= stopped.get("checkpoint_step", 0)
    session.predict(api_name="/abort")
    wait_status(session, rf"{run_id}: (aborted|stopped)")

    losses, memories = session.predict([run_id], api_name="/overlay")
    assert {r[2] for r in losses["data"]} == {f"{run_id} (train)"}
    session.predict(run_id, [], api_name="/delete")
    assert not run_dir.exists()


def test_a_second_start_waits_in_the_queue(app, tiny_llama_dir):
    first, second = Client(app.url, verbose=False), Client(app.url, verbose=False)
    for visitor in (first, second):
        inspect(visitor, EXAMPLE, tiny_llama_dir)
    a = run_id_of(first.predict(*settings(tiny_llama_dir), api_name="/start")[0])
    b_text = second.predict(*settings(tiny_llama_dir), api_name="/start")[0]
    b = run_id_of(b_text)
    try:
        status_b = json.loads((app.runs_dir / b / "status.json").read_text())
        assert status_b["state"] == "queued"
        assert "queued** (position 1)" in b_text
    finally:
        second.predict(api_name="/abort")
        first.predict(api_name="/abort")
    from lora_studio.runner import Runner

    assert Runner(app.runs_dir).wait(a, timeout=120)["state"] in ("aborted", "stopped")
    assert json.loads((app.runs_dir / b / "status.json").read_text())["state"] == "aborted"


def test_login_protects_the_api(tmp_path, tiny_llama_dir):
    app = launch_app(
        tmp_path / "runs", tiny_llama_dir, tmp_path / "app.log",
        {"LORA_STUDIO_USER": "ana", "LORA_STUDIO_PASSWORD": "s3cret-pass"},
    )  # fmt: skip
    try:
        import urllib.error
        import urllib.request

        for endpoint in ("config", "gradio_api/info"):
            with pytest.raises(urllib.error.HTTPError) as denied:
                urllib.request.urlopen(app.url + endpoint, timeout=10)
            assert denied.value.code == 401
        client = Client(app.url, auth=("ana", "s3cret-pass"), verbose=False)
        table = client.predict([], None, api_name="/runs")[0]
        assert table["data"] == [] or table["data"] == [[None] * len(table["headers"])]
    finally:
        stop_app(app)


def test_strategy_is_offered_and_estimated_per_gpu_only_with_several(tiny_llama_dir, monkeypatch):
    import torch

    from lora_studio.config import TrainConfig
    from lora_studio.ui import train_tab

    class FakeStudio:
        class runner:  # noqa: N801 - stands for Studio.runner
            gpus = "auto"

    assert train_tab.visible_gpus(FakeStudio) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert train_tab.visible_gpus(FakeStudio) == 4
    FakeStudio.runner.gpus = "2"
    assert train_tab.visible_gpus(FakeStudio) == 2
    monkeypatch.undo()

    cfg = TrainConfig(model=tiny_llama_dir, rank=4, strategy="fsdp", precision="fp32")
    assert "per rank" not in train_tab.preflight_text(cfg, 64)
    text = train_tab.preflight_text(cfg, 64, world=2)
    assert "per rank of 2 (FSDP)" in text and "gathered blocks" in text
    with pytest.raises(ValueError, match="LoRA-Pro cannot train with --strategy fsdp"):
        train_tab.preflight_text(TrainConfig(model=tiny_llama_dir, method="lora-pro", strategy="fsdp"), 64, world=2)
    assert "per rank of 2 (DDP)" in train_tab.preflight_text(TrainConfig(model=tiny_llama_dir, strategy="ddp"), 64, world=2)
