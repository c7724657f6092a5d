"""The chat engine: streamed replies equal the plain replies; an abandoned stream leaves the
shared model with its adapter on and the lock free; votes from parallel visitors all count."""

from __future__ import annotations

import threading

import pytest

from lora_studio.chat import ChatEngine, describe_votes, read_votes, record_vote
from lora_studio.compare import GenerationSettings, TunedModel
from lora_studio.methods import adapter_layers
from tests.ui.conftest import train_tiny_run

SETTINGS = GenerationSettings(max_new_tokens=16)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir):
    runs = tmp_path_factory.mktemp("chat") / "runs"
    runs.mkdir()
    return train_tiny_run(runs, tiny_llama_dir)


@pytest.mark.parametrize("tuned", [False, True])
def test_stream_ends_with_the_plain_reply(run_dir, tuned):
    engine = ChatEngine(device="cpu")
    pieces = list(engine.stream(run_dir, [{"role": "user", "content": "Say the word dog"}], tuned, SETTINGS))
    assert len(pieces) > 2 and all(b.startswith(a.strip()) for a, b in zip(pieces, pieces[1:]))
    assert pieces[-1] == TunedModel(run_dir, device="cpu").reply("Say the word dog", tuned, SETTINGS)


def test_abandoned_stream_restores_the_adapter_and_frees_the_lock(run_dir):
    engine = ChatEngine(device="cpu")
    stream = engine.stream(run_dir, [{"role": "user", "content": "hello"}], False, GenerationSettings(max_new_tokens=200))
    next(stream)
    model = engine._model.model  # the one shared model
    assert all(layer.disabled for layer in adapter_layers(model).values())  # base reply in progress
    stream.close()  # the visitor went away
    assert not engine.lock.locked()
    assert not any(layer.disabled for layer in adapter_layers(model).values())
    assert not any(t.name == "chat-generate" and t.is_alive() for t in threading.enumerate())
    # and the next reply is the tuned one, as if nothing happened
    assert engine.reply(run_dir, [{"role": "user", "content": "hello"}], True, SETTINGS) == TunedModel(
        run_dir, device="cpu"
    ).reply("hello", True, SETTINGS)


def test_one_model_in_memory(run_dir):
    engine = ChatEngine(device="cpu")
    first = engine.model_for(run_dir)
    assert engine.model_for(run_dir) is first


def test_parallel_votes_all_count(tmp_path):
    threads = [threading.Thread(target=record_vote, args=(tmp_path, "tuned" if i % 3 else "tie")) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert read_votes(tmp_path) == {"tuned": 20, "base": 0, "tie": 10}
    assert "tuned preferred 20" in describe_votes(read_votes(tmp_path)) and "100%" in describe_votes(read_votes(tmp_path))
    with pytest.raises(ValueError, match="vote must be one of"):
        record_vote(tmp_path, "left")


def test_a_stuck_reader_does_not_block_chat_forever(run_dir):
    engine = ChatEngine(device="cpu", wait_s=0.5)
    stuck = engine.stream(run_dir, [{"role": "user", "content": "hello"}], True, SETTINGS)
    next(stuck)  # holds the model, never read again
    with pytest.raises(TimeoutError, match="busy"):
        engine.reply(run_dir, [{"role": "user", "content": "hi"}], False, SETTINGS)
    stuck.close()
    assert engine.reply(run_dir, [{"role": "user", "content": "hi"}], False, SETTINGS)
