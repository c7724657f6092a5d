"""The engine's side: build_datasets from a TrainConfig, prepare() with val_examples and
packing, a short packed run, and the CLI flags and `inspect` subcommand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_studio.cli import main
from lora_studio.cli_flags import _train_parser, config_from_args
from lora_studio.config import TrainConfig
from lora_studio.data import DataError, build_datasets
from tests.conftest import format_rows


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def distinct_rows(n: int) -> list[dict]:
    return [{"instruction": f"Say the word number {i}", "output": f"ANSWER: {i}"} for i in range(n)]


def test_build_datasets_with_val_fraction(tmp_path, tokenizer):
    cfg = TrainConfig(data=str(jsonl(tmp_path / "d.jsonl", distinct_rows(20))), val_fraction=0.25, seed=1)
    train, val, report = build_datasets(cfg, tokenizer)
    assert (len(train), len(val)) == (15, 5) and (report.n_train, report.n_val) == (15, 5)
    assert {e.row for e in train}.isdisjoint({e.row for e in val})


def test_build_datasets_with_val_file_and_column_mapping(tmp_path, tokenizer):
    train_path = tmp_path / "train.csv"
    train_path.write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(6)))
    val_path = tmp_path / "val.csv"
    val_path.write_text("question,answer\nqv,av\nbad,\n")
    cfg = TrainConfig(data=str(train_path), val_data=str(val_path), columns={"instruction": "question", "output": "answer"})
    with pytest.raises(DataError) as e:
        build_datasets(cfg, tokenizer)
    assert [(p.file, p.row, p.field) for p in e.value.problems] == [(str(val_path), 3, "answer")]
    cfg.drop_invalid = True
    train, val, report = build_datasets(cfg, tokenizer)
    assert (len(train), len(val)) == (6, 1) and [e.file for e in val] == [str(val_path)]
    assert report.files == [str(train_path), str(val_path)] and report.n_dropped == 1


def test_config_checks_the_new_fields():
    with pytest.raises(ValueError, match="val_fraction must be in"):
        TrainConfig(data="d", out="o", val_fraction=1.5).resolved()
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(data="d", out="o", val_fraction=0.1, val_data="v.jsonl").resolved()
    with pytest.raises(ValueError, match="format must be one of"):
        TrainConfig(data="d", out="o", format="csv").resolved()
    cfg = TrainConfig(data="d", out="o", format="sharegpt", columns={"conversations": "chat"}, packing=True)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_prepare_returns_val_examples_and_packs(tmp_path, tiny_llama_dir):
    from lora_studio.engine.loop import prepare
    from lora_studio.engine.plan import make_plan

    data = jsonl(tmp_path / "d.jsonl", distinct_rows(16))
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path / "run"), model=tiny_llama_dir, rank=4, max_seq_len=64, val_fraction=0.25, packing=True
    ).resolved()
    parts = prepare(make_plan(cfg))
    assert len(parts["val_examples"]) == 4 and all(e.position_ids is None for e in parts["val_examples"])
    packed = parts["examples"]
    assert all(e.position_ids is not None and len(e.input_ids) <= 64 for e in packed)
    assert len(packed) < 12 and sum(p.position_ids.count(0) for p in packed) == 12
    assert parts["data_report"].n_train == 12


def test_short_packed_run_writes_the_data_report(tmp_path, tiny_llama_dir):
    from lora_studio.engine.run import train

    data = jsonl(tmp_path / "d.jsonl", format_rows(24))  # 8 distinct rows, each three times
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path / "run"), model=tiny_llama_dir, rank=4, max_seq_len=64, batch_size=2,
        max_steps=2, packing=True, val_fraction=0.2,
    )
    status = train(cfg)
    assert status["state"] == "done", status.get("error")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["n_duplicates"] == 16 and report["n_train"] + report["n_val"] == 24
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["trained_tokens"] > 0 for m in metrics)


def test_train_refuses_bad_data_with_the_row(tmp_path, tiny_llama_dir):
    from lora_studio.engine.run import train

    data = jsonl(tmp_path / "d.jsonl", distinct_rows(3) + [{"instruction": "x", "output": 5}])
    status = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), model=tiny_llama_dir, rank=4, max_steps=1))
    assert status["state"] == "failed"
    assert f"{data}, row 4, field 'output': expected text, got a number (5)" in status["error"]


def test_cli_flags_reach_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    _train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        "train --data d.csv --out o --format alpaca --columns instruction=question,output=answer "
        "--val-data v.csv --packing --drop-invalid --system-prompt hi".split()
    )
    cfg = config_from_args(args)
    assert cfg.columns == {"instruction": "question", "output": "answer"}
    assert (cfg.format, cfg.val_data, cfg.packing, cfg.drop_invalid, cfg.system_prompt) == ("alpaca", "v.csv", True, True, "hi")
    args = parser.parse_args("train --data d --out o --val-fraction 0.1".split())
    cfg = config_from_args(args)
    assert cfg.val_fraction == 0.1 and not cfg.packing and cfg.columns == {}


def test_cli_inspect(tmp_path, tiny_llama_dir, capsys):
    good = jsonl(tmp_path / "good.jsonl", distinct_rows(3))
    assert main(["inspect", "--data", str(good), "--model", tiny_llama_dir, "--samples", "1", "--max-seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "3 rows, format alpaca (detected)" in out and "--- row 1" in out and "[[ANSWER: 0<|im_end|>]]" in out
    csv = tmp_path / "qa.csv"
    csv.write_text("question,answer\nhi,there\nwhat,\n")
    code = main(["inspect", "--data", str(csv), "--model", tiny_llama_dir, "--columns", "instruction=question,output=answer"])
    out = capsys.readouterr().out
    assert code == 1 and f"error: {csv}, row 3, field 'answer': empty" in out


def test_examples_folder_datasets_load(tokenizer):
    root = Path(__file__).resolve().parents[2] / "examples"
    expected = {
        "json_answers.jsonl": ("alpaca", {}),
        "chat_messages.jsonl": ("messages", {}),
        "sharegpt_support.json": ("sharegpt", {}),
        "science_qa.csv": ("alpaca", {"instruction": "question", "output": "answer"}),
    }
    for name, (fmt, columns) in expected.items():
        examples, report = build_datasets(TrainConfig(data=str(root / name), columns=columns, max_seq_len=512), tokenizer)[::2]
        assert report.format == fmt and report.ok, report.summary()
        assert report.n_rows >= 20 and report.n_truncated == 0 and len(examples) == report.n_rows
