"""Several sessions on one real app in local mode (`python app.py`, gradio_client sessions in
threads): one training, one queued behind it, three chatting with finished runs at the same time.
In local mode every session is the operator's, so all see and may act on every run (a public
app, where each visitor owns their runs and is refused on anyone else's, is
tests/hardening/test_app_public.py). Each keeps its own chat history (replies checked against the
chat engine run in the test on that session's own history), all see the same run states, two
stop clicks on one run, a stop while checkpoints are written every step, and the delete of a
running, a stopping and a just-stopped run."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

from lora_studio.compare import GenerationSettings
from lora_studio.runner import Runner
from tests.hardening.webapp import EXAMPLE, assert_serving, inspect, settings
from tests.helpers import wait_for
from tests.ui.conftest import launch_app, stop_app, train_tiny_run

GREEDY = (0.0, 1.0, 10)  # temperature, top_p, max new tokens


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("app-concurrency")
    (root / "runs").mkdir()
    train_tiny_run(root / "runs", tiny_llama_dir, run_id="run-a", steps=8)
    train_tiny_run(root / "runs", tiny_llama_dir, run_id="run-b", steps=3)
    launched = launch_app(root / "runs", tiny_llama_dir, root / "app.log")
    yield launched
    stop_app(launched)


def visitor(app) -> Client:
    return Client(app.url, verbose=False)


def run_id_of(text: str) -> str:
    return re.match(r"\*\*(\S+): ", text).group(1)


def text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def state_of(app, run_id: str) -> dict:
    return json.loads((app.runs_dir / run_id / "status.json").read_text())


def run_pids(app, run_id: str) -> list[int]:
    """The supervisor, worker and trainer processes a run ever recorded."""
    folder = app.runs_dir / run_id
    sup = json.loads((folder / "supervisor.json").read_text()) if (folder / "supervisor.json").exists() else {}
    status = state_of(app, run_id) if (folder / "status.json").exists() else {}
    return [p for p in (sup.get("pid"), sup.get("worker_pid"), status.get("pid")) if p]


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def start_long_run(app, client: Client, model: str, **over) -> str:
    summary, *_ = inspect(client, EXAMPLE, model)
    assert "ready to train" in summary
    values = dict(max_steps=5000, batch_size=4, checkpoint_every=0, eval_every=0)
    values.update(over)
    return run_id_of(client.predict(*settings(model, **values), api_name="/start")[0])


def table_states(client: Client) -> dict[str, str]:
    table = client.predict([], None, api_name="/runs")[0]
    return {row[0]: row[1] for row in table["data"]}


def test_visitors_keep_their_own_chats_and_see_the_same_runs(app, tiny_llama_dir):
    from lora_studio.chat import ChatEngine

    trainer, waiter = visitor(app), visitor(app)
    training = start_long_run(app, trainer, tiny_llama_dir)
    queued = start_long_run(app, waiter, tiny_llama_dir)
    assert state_of(app, queued)["state"] == "queued"
    wait_for(lambda: state_of(app, training)["state"] == "running" and state_of(app, training).get("step", 0) >= 1, timeout=120, every=0.2)

    plans = {  # visitor -> (run, two messages)
        "c1": ("run-a", ["Say the word fox", "Say the word dog"]),
        "c2": ("run-b", ["Say the word dog", "hello"]),
        "c3": ("run-a", ["hello", "Say the word Paris"]),
    }
    chatters = {name: visitor(app) for name in plans}
    results: dict[str, tuple] = {}
    errors: list[BaseException] = []
    seen_states: list[dict[str, str]] = []

    def chat(name: str) -> None:
        try:
            client, (run, messages) = chatters[name], plans[name]
            base, tuned = [], []
            for message in messages:
                _, base, tuned = client.predict(run, message, base, tuned, *GREEDY, api_name="/chat")
                seen_states.append(table_states(client))  # every visitor's view of the runs, mid-chat
            results[name] = (base, tuned)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=chat, args=(name,)) for name in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert set(results) == set(plans)

    engine = ChatEngine(device="cpu")  # the oracle: the same engine, in this process, per history
    gen = GenerationSettings(max_new_tokens=GREEDY[2], temperature=GREEDY[0], top_p=GREEDY[1])
    for name, (run, messages) in plans.items():
        base, tuned = results[name]
        for history, is_tuned in ((base, False), (tuned, True)):
            assert [m["role"] for m in history] == ["user", "assistant"] * len(messages)
            assert [text_of(m) for m in history[::2]] == messages  # only this visitor's messages
            so_far: list[dict[str, str]] = []
            for user, reply in zip(history[::2], history[1::2]):
                so_far.append({"role": "user", "content": text_of(user)})
                assert text_of(reply) == engine.reply(app.runs_dir / run, so_far, tuned=is_tuned, settings=gen), (name, so_far)
                so_far.append({"role": "assistant", "content": text_of(reply)})
    tuned_replies = {name: text_of(results[name][1][1]) for name in plans}
    base_replies = {name: text_of(results[name][0][1]) for name in plans}
    assert len(set(tuned_replies.values()) | set(base_replies.values())) > 1  # not one answer for all

    # Every visitor, at every moment checked, saw the trainer's run active and the other queued.
    assert len(seen_states) == 6
    for states in seen_states:
        assert states[training] in ("starting", "running") and states[queued] == "queued", states
        assert states["run-a"] == states["run-b"] == "done"
    views = [visitor(app) for _ in range(3)]
    attached = {run_id_of(v.predict(api_name="/attach")[0]) for v in views}
    assert attached == {training}  # local mode: a new page of the operator's attaches to the running run

    # The waiting visitor leaves the queue (tests/ui/test_api_train.py shows the queue advancing).
    waiter.predict(api_name="/abort")
    assert state_of(app, queued)["state"] == "aborted" and not run_pids(app, queued)
    # Two stop clicks on the same run: the trainer, then another visitor attached to it, then again.
    trainer.predict(api_name="/stop")
    views[0].predict(api_name="/stop")
    trainer.predict(api_name="/stop")
    final = Runner(app.runs_dir).wait(training, timeout=120)
    assert final["state"] == "stopped" and (app.runs_dir / training / "adapter" / "adapter_config.json").exists()
    assert len(list((app.runs_dir / training / "checkpoints").iterdir())) == 1  # one stop, one checkpoint
    states = [table_states(c) for c in (trainer, waiter, *chatters.values(), *views)]
    assert all(s == states[0] for s in states) and states[0][training] == "stopped" and states[0][queued] == "aborted"
    wait_for(lambda: not alive(run_pids(app, training)), timeout=30, every=0.2)


def test_two_visitors_blind_votes_stay_their_own(app):
    votes = app.runs_dir / "run-a" / "votes.json"
    votes.unlink(missing_ok=True)
    x, y = visitor(app), visitor(app)
    x.predict("run-a", "Say the word fox", *GREEDY, api_name="/blind_ask")
    y.predict("run-a", "hello", *GREEDY, api_name="/blind_ask")
    verdict_x, _ = x.predict("run-a", api_name="/vote_a")
    verdict_y, tally = y.predict("run-a", api_name="/vote_b")
    side_x = re.search(r"Model (A|B) was the \*\*tuned", verdict_x).group(1)
    side_y = re.search(r"Model (A|B) was the \*\*tuned", verdict_y).group(1)
    counts = json.loads(votes.read_text())
    expected = {"tuned": (side_x == "A") + (side_y == "B"), "base": (side_x != "A") + (side_y != "B"), "tie": 0}
    assert counts == expected and "2 vote(s)" in tally
    with pytest.raises(AppError, match="Ask a prompt first"):  # each visitor's pending pair took its one vote
        x.predict("run-a", api_name="/vote_b")


def test_stop_during_checkpoints_and_delete_of_a_running_run(app, tiny_llama_dir):
    """A checkpoint every step, so a stop lands during or right next to a checkpoint write; twice
    (stop, resume, stop). Each time the run ends stopped, with complete checkpoints only, an
    adapter, and a resume that continues from the last checkpoint. Meanwhile, the delete of the
    running run (by its owner and by another visitor) and of a stopping run is refused; a queued
    run is deleted at once; the stopped run is deleted the moment its state allows it, and no
    process of it survives nor does its folder come back."""
    owner, other = visitor(app), visitor(app)
    run_id = start_long_run(app, owner, tiny_llama_dir, checkpoint_every=1)
    folder = app.runs_dir / run_id
    wait_for(lambda: state_of(app, run_id).get("state") == "running" and state_of(app, run_id).get("step", 0) >= 3, timeout=120, every=0.2)
    owner.predict(api_name="/stop")
    status = Runner(app.runs_dir).wait(run_id, timeout=120)
    check_stopped(folder, status)
    message = owner.predict(run_id, api_name="/resume")[0]
    assert "resumes" in message
    wait_for(lambda: state_of(app, run_id).get("state") == "running" and state_of(app, run_id).get("step", 0) >= status["step"] + 3, timeout=120, every=0.2)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps[: status["step"] + 3] == list(range(1, status["step"] + 4))  # resumed: no step lost or repeated
    refuse_deletes(app, run_id, owner, other, tiny_llama_dir)
    pids = run_pids(app, run_id)
    owner.predict(api_name="/stop")
    # A stop is pending, or has just been written while the worker and its supervisor exit:
    # deleted the moment the state allows it, after which no process of the run survives and the
    # folder does not come back (a late status write, a heartbeat).
    wait_for(lambda: _try_delete(owner, run_id), timeout=120, every=0.05)
    assert not folder.exists()
    wait_for(lambda: not alive(pids), timeout=30, every=0.2)
    time.sleep(2)
    assert not folder.exists() and run_id not in table_states(owner)
    assert_serving(app, owner, tiny_llama_dir)


def check_stopped(folder: Path, status: dict) -> None:
    from lora_studio.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

    assert status["state"] == "stopped", status
    leftovers = [p.name for p in (folder / "checkpoints").iterdir() if not re.match(r"^step-\d+$", p.name)]
    assert leftovers == []  # no half-written step-N.tmp
    last = latest_checkpoint(folder)
    assert last is not None and int(last.name.split("-")[1]) == status["step"]
    assert all((c / "state.json").exists() for c in list_checkpoints(folder))
    state = load_checkpoint(last, 0, torch.device("cpu"))
    assert state["state"]["step"] == status["step"] and state["model"] and state["optimizer"]
    assert (folder / "adapter" / "adapter_config.json").exists()


def refuse_deletes(app, run_id: str, owner: Client, other: Client, model: str) -> None:
    folder = app.runs_dir / run_id
    files_before = {p.name for p in folder.iterdir()}
    for client in (owner, other):  # the owner, and a session of the operator's that never saw it start
        with pytest.raises(AppError, match="stop it before deleting"):
            client.predict(run_id, [], api_name="/delete")
    # (a status write's temp file, `.status.json.<pid>.<hex>.tmp`, lives only for its rename)
    kept = {name for name in files_before if name != "heartbeat" and not name.endswith(".tmp")}
    assert {p.name for p in folder.iterdir()} >= kept and alive(run_pids(app, run_id))
    # Queued behind it: a queued run has no process and may go at once.
    queued = start_long_run(app, other, model)
    assert state_of(app, queued)["state"] == "queued"
    other.predict(queued, [], api_name="/delete")
    assert not (app.runs_dir / queued).exists() and queued not in table_states(owner)


def _try_delete(client: Client, run_id: str) -> bool:
    try:
        client.predict(run_id, [], api_name="/delete")
        return True
    except AppError as e:
        assert re.search(r"stop it before deleting|still finishing", str(e)), str(e)
        return False


def test_the_runner_refuses_to_delete_a_run_whose_process_is_still_exiting(tmp_path):
    """The state is final, the supervisor is still alive (it is about to start the next queued
    run): refused, so it never fails on a vanished folder; once it is gone, deleted."""
    import subprocess
    import sys

    from lora_studio import runfiles as rf
    from lora_studio.runner import SUPERVISOR, _create_time

    runner = Runner(tmp_path / "runs", max_active=0)
    folder = tmp_path / "runs" / "just-stopped"
    folder.mkdir()
    rf.write_status(folder, rf.STOPPED, step=3)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rf.write_json_atomic(folder / SUPERVISOR, {"pid": sleeper.pid, "pid_started": _create_time(sleeper.pid), "host": rf.hostname()})
        with pytest.raises(ValueError, match="still finishing"):
            runner.delete("just-stopped")
        assert (folder / "status.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    runner.delete("just-stopped")
    assert not folder.exists()
