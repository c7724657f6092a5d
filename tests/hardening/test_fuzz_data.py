"""Fuzzing the data loader: random bytes, random JSON values and byte-mutated good files
written under every supported extension either load (a report naming any bad rows) or raise
DataError. Any other exception (a traceback in the UI) fails the test."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_studio.data import DataError
from lora_studio.data.validate import load_samples

EXTENSIONS = [".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ""]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRIED = {"n": 0}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["instruction", "input", "output", "messages", "role", "content", "text", "prompt",
                         "completion", "conversations", "from", "value", "x"]), kids, max_size=4),
    max_leaves=12,
)
GOOD = (
    '{"instruction": "Name a colour.", "output": "Blue."}\n'
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
)


def check(data: bytes, suffix: str) -> None:
    TRIED["n"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{suffix}"
        path.write_bytes(data)
        try:
            samples, report = load_samples(path)
        except DataError as e:
            assert str(e).strip()  # a message, naming the file
            return
        assert isinstance(samples, list)
        assert report is not None


@pytest.mark.parametrize("suffix", EXTENSIONS)
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(suffix, data):
    check(data, suffix)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
@FUZZ
@given(values=st.lists(json_values, max_size=6))
def test_random_json_values(suffix, values):
    if suffix == ".json":
        text = json.dumps(values)
    elif suffix == ".jsonl":
        text = "".join(json.dumps(v) + "\n" for v in values)
    else:
        text = "instruction,output\n" + "".join(f"{json.dumps(v)},{json.dumps(v)}\n" for v in values)
    check(text.encode("utf-8", "surrogatepass"), suffix)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@FUZZ
@given(cut=st.integers(0, len(GOOD)), junk=st.binary(max_size=16), pos=st.integers(0, len(GOOD)))
def test_mutated_good_file(suffix, cut, junk, pos):
    data = GOOD.encode()
    data = data[:pos] + junk + data[pos:cut] if pos < cut else data[:cut] + junk
    check(data, suffix)


def test_fuzz_tried_inputs():
    """Runs last in this file: the fuzz above really ran (not skipped or filtered away)."""
    if TRIED["n"] == 0:
        pytest.skip("run with the fuzz tests to count them")
    assert TRIED["n"] >= 100
    print(f"\nfuzz inputs tried: {TRIED['n']}")
