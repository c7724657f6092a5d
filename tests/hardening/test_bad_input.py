"""Bad input through the CLI (`lora_studio.cli.main`, what `python -m lora_studio train` runs):
each case ends with a non-zero exit and a clear first line on stderr naming the problem, never
an exception. The cases run in this process (a subprocess each cost ~4 s of imports); the
control case and the size limit go through a real `python -m lora_studio train` subprocess.
Plus the data file size limit and content sniffing in lora_studio/data/sources.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lora_studio.data import DataError
from lora_studio.data.sources import MAX_MB_ENV, read_source

ROOT = Path(__file__).resolve().parents[2]


def _rows(n: int) -> str:
    return "".join(json.dumps({"instruction": f"question {i}", "output": f"answer {i}"}) + "\n" for i in range(n))


def _files(d: Path) -> dict[str, Path]:
    d.mkdir(exist_ok=True)
    f = {
        "ok": d / "ok.jsonl",
        "junk": d / "junk.jsonl",
        "zip": d / "export.jsonl",
        "pdf": d / "data.csv",
        "deep_json": d / "deep.json",
        "deep_jsonl": d / "deep.jsonl",
        "empty": d / "empty.jsonl",
        "no_rows": d / "none.json",
        "header_only": d / "header.csv",
        "bad_json": d / "bad.json",
    }
    f["ok"].write_text(_rows(4))
    f["junk"].write_bytes(bytes(range(256)) * 8)
    with zipfile.ZipFile(f["zip"], "w") as z:
        z.writestr("data.jsonl", _rows(4))
    f["pdf"].write_bytes(b"%PDF-1.7\n" + b"x" * 100)
    f["deep_json"].write_text("[" * 50000 + "]" * 50000)
    f["deep_jsonl"].write_text('{"instruction": ' + "[" * 50000 + "]" * 50000 + ', "output": "x"}\n')
    f["empty"].write_text("")
    f["no_rows"].write_text("[]")
    f["header_only"].write_text("instruction,output\n")
    f["bad_json"].write_text('[{"instruction": "a", "output": ')
    nw = d / "noweights"
    nw.mkdir(exist_ok=True)
    (nw / "config.json").write_text('{"model_type": "llama"}')
    return f


# (case, extra args (data given by key), words the first stderr line must contain)
CASES = [
    ("rank 0", ["--rank", "0"], "rank must be at least 1"),
    ("negative lr", ["--lr", "-0.1"], "lr must be positive"),
    ("nan lr", ["--lr", "nan"], "lr must be positive"),
    ("epochs 0", ["--epochs", "0"], "epochs must be positive"),
    ("batch larger than the data", ["--batch-size", "50"], "larger than the data"),
    ("dropout 1", ["--dropout", "1"], "dropout must be in [0, 1)"),
    ("max seq len 0", ["--max-seq-len", "0"], "max_seq_len must be at least 8"),
    ("binary junk", ["@junk"], "binary data"),
    ("zip named .jsonl", ["@zip"], "zip archive"),
    ("pdf named .csv", ["@pdf"], "PDF document"),
    ("deeply nested JSON", ["@deep_json"], "nested too deeply"),
    ("deeply nested JSONL row", ["@deep_jsonl"], "nested too deeply"),
    ("empty file", ["@empty"], "the file is empty"),
    ("zero rows", ["@no_rows"], "holds no rows"),
    ("header only", ["@header_only"], "holds no rows"),
    ("malformed JSON", ["@bad_json"], "not valid JSON"),
    ("missing data file", ["--data", "/nonexistent/d.jsonl"], "file not found"),
    ("model folder without weights", ["--model", "@noweights"], "has no weights"),
    ("model folder that does not exist", ["--model", "/nonexistent/model"], "does not exist"),
    ("unknown option", ["--option", "nonsense"], "expected KEY=VALUE"),
    ("config that is not JSON", ["--config", "@junk"], "not a LoRA Studio config.json"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return _files(tmp_path_factory.mktemp("bad"))


def run_cli(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.pop("LORA_STUDIO_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lora_studio", "train", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("case,extra,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(
    tiny_llama_dir, files, tmp_path, capfd, monkeypatch, case, extra, words
):
    data = str(files["ok"])
    args, i = [], 0
    while i < len(extra):
        item = extra[i]
        if item.startswith("@"):  # a bad data file in place of the good one
            data = str(files[item[1:]])
        elif i + 1 < len(extra) and extra[i + 1].startswith("@"):
            args += [item, str(files[extra[i + 1][1:]]) if extra[i + 1][1:] in files else str(files["ok"].parent / extra[i + 1][1:])]
            i += 1
        else:
            args.append(item)
        i += 1
    if "--data" not in args:
        args = ["--data", data, *args]
    if "--model" not in args:
        args += ["--model", tiny_llama_dir]
    from lora_studio.cli import main

    monkeypatch.delenv("LORA_STUDIO_DEBUG", raising=False)
    try:
        code = main(["train", *args, "--out", str(tmp_path / "run"), "--max-steps", "2"])
    except SystemExit as e:  # argparse's refusals; SystemExit("message") as the interpreter shows it
        code = e.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    out, err = capfd.readouterr()
    lines = [l for l in err.splitlines() if l.strip() and "it/s]" not in l and "Loading weights" not in l]
    assert code not in (0, None), out[-500:]
    assert "Traceback" not in err, err[-3000:]
    assert lines, "no message on stderr"
    assert words in lines[0], lines
    assert len(lines[0]) < 400


def test_the_good_file_trains(tiny_llama_dir, files, tmp_path):
    """The control: the same command with good input succeeds (the cases above fail for their reason)."""
    proc = run_cli(["--data", str(files["ok"]), "--model", tiny_llama_dir, "--out", str(tmp_path / "run"),
                    "--max-steps", "2", "--batch-size", "4"])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_size_limit_is_checked_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    path.write_text(_rows(2000))  # ~100 KB
    monkeypatch.setenv(MAX_MB_ENV, "0.05")

    def never(*a, **k):
        raise AssertionError("the file was read despite being over the limit")

    monkeypatch.setattr(Path, "read_bytes", never)
    monkeypatch.setattr(Path, "open", never)
    with pytest.raises(DataError, match=r"over the 0.05 MB limit \(LORA_STUDIO_MAX_UPLOAD_MB\)"):
        read_source(path)
    monkeypatch.undo()
    monkeypatch.setenv(MAX_MB_ENV, "1")
    assert len(read_source(path).rows) == 2000  # under the limit: read


def test_size_limit_through_the_cli(tiny_llama_dir, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(_rows(3000))
    proc = run_cli(["--data", str(path), "--model", tiny_llama_dir, "--out", str(tmp_path / "run")], {MAX_MB_ENV: "0.1"})
    assert proc.returncode != 0 and "over the 0.1 MB limit" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv"])
def test_text_formats_refuse_binary_content(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 50)
    with pytest.raises(DataError, match="zip archive"):
        read_source(path)
