"""Chat with a run: one model in memory, the adapter switched off for the base reply and on
for the tuned one, replies streamed token by token.

The adapter switch is a flag on the shared model, so only one reply is generated at a time
(`ChatEngine.lock`); a reply abandoned half-way (a closed browser tab) stops its generation
thread before the lock is released, so the next reply never sees the switch in the wrong place.
No gradio here: the UI and tests drive this the same way.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Iterator

import torch

from lora_studio.compare import GenerationSettings, TunedModel
from lora_studio.methods import disable_adapter
from lora_studio.runfiles import write_json_atomic

Message = dict[str, str]


class _StopFlag:
    """A stopping criterion that ends `generate` when the reader has gone away."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        # (batch,) bool: True ends generation for that row
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    """Holds at most one run's model (loading another run replaces it) and streams replies."""

    def __init__(self, device: str | None = None, wait_s: float = 600.0) -> None:
        self.device = device
        self.wait_s = wait_s
        """How long a reply waits for the one before it (a stuck reader must not block chat forever)."""
        self.lock = threading.Lock()
        self._run_dir: Path | None = None
        self._model: TunedModel | None = None

    def model_for(self, run_dir: str | Path) -> TunedModel:
        """The run's model, loaded on first use (the previous run's model is dropped first)."""
        run_dir = Path(run_dir).resolve()
        with self._locked():
            if self._model is None or self._run_dir != run_dir:
                self._model = None  # free the old weights before loading the new ones
                self._run_dir = None
                self._model = TunedModel(run_dir, device=self.device)
                self._run_dir = run_dir
            return self._model

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.lock.acquire(timeout=self.wait_s):
            raise TimeoutError("the model is busy with another reply; try again in a moment")
        try:
            yield
        finally:
            self.lock.release()

    @contextlib.contextmanager
    def using(self, run_dir: str | Path) -> Iterator[TunedModel]:
        """The run's model, held by this caller alone until the block ends (scoring a batch)."""
        tm = self.model_for(run_dir)
        with self._locked():
            if self._model is not tm:  # another run was loaded in between
                raise TimeoutError("the model was switched to another run; try again")
            yield tm

    def unload(self) -> None:
        with self._locked():
            self._model = None
            self._run_dir = None

    def reply(
        self, run_dir: str | Path, messages: list[Message], tuned: bool, settings: GenerationSettings | None = None
    ) -> str:
        """The whole reply (what `stream` yields last)."""
        text = ""
        for text in self.stream(run_dir, messages, tuned, settings):
            pass
        return text

    def stream(
        self, run_dir: str | Path, messages: list[Message], tuned: bool, settings: GenerationSettings | None = None
    ) -> Iterator[str]:
        """Yield the reply so far (growing text) to the last user message of `messages`."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        tm = self.model_for(run_dir)
        with self._locked():
            ids = tm.messages_ids(messages)
            streamer = TextIteratorStreamer(tm.tokenizer, skip_prompt=True, skip_special_tokens=True)
            stop = _StopFlag()
            kwargs = tm.generate_kwargs(ids, settings)
            kwargs.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([stop]))
            failure: list[BaseException] = []

            def generate() -> None:
                try:
                    with torch.no_grad(), (contextlib.nullcontext() if tuned else disable_adapter(tm.model)):
                        tm.model.generate(ids, **kwargs)
                except BaseException as e:  # noqa: BLE001 - re-raised in the reader below
                    failure.append(e)
                    streamer.end()

            thread = threading.Thread(target=generate, name="chat-generate", daemon=True)
            thread.start()
            text = ""
            try:
                for piece in streamer:
                    text += piece
                    yield text
            finally:
                stop.event.set()
                thread.join()
            if failure:
                raise failure[0]
            yield text.strip()


# ---------------------------------------------------------------- blind A/B votes

VOTES_FILE = "votes.json"
VOTE_CHOICES = ("tuned", "base", "tie")


def read_votes(run_dir: str | Path) -> dict[str, int]:
    """The run's blind-comparison tally: how often the tuned reply, the base reply or neither won."""
    path = Path(run_dir) / VOTES_FILE
    counts = json.loads(path.read_text()) if path.exists() else {}
    return {k: int(counts.get(k, 0)) for k in VOTE_CHOICES}


_votes_lock = threading.Lock()


def record_vote(run_dir: str | Path, winner: str) -> dict[str, int]:
    """Add one vote (`tuned`, `base` or `tie`) to the run's tally and return the new tally."""
    if winner not in VOTE_CHOICES:
        raise ValueError(f"vote must be one of {', '.join(VOTE_CHOICES)} (got {winner!r})")
    with _votes_lock:  # two visitors voting at once must both count
        counts = read_votes(run_dir)
        counts[winner] += 1
        write_json_atomic(Path(run_dir) / VOTES_FILE, counts)
    return counts


def describe_votes(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "No votes yet."
    decided = counts["tuned"] + counts["base"]
    rate = f"{100 * counts['tuned'] / decided:.0f}%" if decided else "n/a"
    return (
        f"{total} vote(s): tuned preferred {counts['tuned']}, base preferred {counts['base']}, "
        f"tie {counts['tie']}. Tuned win rate (ties left out): {rate}."
    )


# ---------------------------------------------------------------- held-out prompts


def heldout_prompts(run_dir: str | Path, tokenizer: object) -> list[dict[str, str]]:
    """The run's validation rows as {"prompt", "reference"}: its `val_data` file, or the rows
    its `val_fraction` held out (the same split the trainer made: same data, settings, seed).
    The prompt is the conversation's first user turn; the reference is the reply that follows."""
    from lora_studio.config import TrainConfig
    from lora_studio.data import build_datasets, load_samples, parse_columns

    cfg = TrainConfig.load(Path(run_dir) / "config.json")
    if not cfg.val_data and not cfg.val_fraction:
        raise ValueError("this run has no validation data (set a validation fraction or file when training)")
    _, val, _ = build_datasets(cfg, tokenizer)
    source = cfg.val_data or cfg.data
    rows = {e.row for e in val}
    samples, _ = load_samples(source, fmt=cfg.format, columns=parse_columns(cfg.columns), system_prompt=None)
    out = []
    for sample in samples:
        if sample.row not in rows or not sample.messages:
            continue
        turns = [m for m in sample.messages if m["role"] != "system"]
        if len(turns) >= 2 and turns[0]["role"] == "user":
            out.append({"prompt": turns[0]["content"], "reference": turns[1]["content"]})
    if not out:
        raise ValueError("the run's validation rows hold no user prompt (plain-text data?)")
    return out
