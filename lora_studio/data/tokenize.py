"""Samples -> token ids with response-only labels, through the model's chat template.

Masking: each assistant turn is rendered twice through the template, once as the prompt
up to that turn (with the generation prompt) and once with the reply; the tokens between
the two renderings are the reply. They are trained up to and including the first EOS;
whatever the template puts after it (a newline) is masked, as are all prompt tokens.
Every assistant turn of a multi-turn conversation is trained this way.

Plain text (format `text`) is trained on every token, with an EOS appended so the model
learns where a document ends.

Tokenizers without a chat template get `models.DEFAULT_CHAT_TEMPLATE` (one line of
`<|role|>` header per turn, each turn closed by EOS), so base models train and chat alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_studio.data.formats import Message, Sample
from lora_studio.data.problems import ERROR, WARNING, DataError, Problem

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where no loss is taken."""
    truncated: bool = False
    full_length: int | None = None
    """Tokens before truncation at max_seq_len (None: not recorded)."""
    file: str | None = None
    """The file the sample came from."""
    row: int | None = None
    """Its row in that file (see sources.py for how rows are numbered)."""
    position_ids: list[int] | None = None
    """Set on packed examples only: positions restart at 0 at each packed sample."""

    @property
    def n_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template our default one (and a pad token)."""
    from lora_studio.models import prepare_tokenizer

    prepare_tokenizer(tokenizer)


def _render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - templates raise jinja errors of their own (e.g. "no system role")
        raise DataError(f"the chat template cannot render this conversation: {e}") from None


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer: Any, messages: list[Message], max_len: int) -> Example:
    """Token ids and labels of one conversation; every assistant turn is trained."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise DataError("the chat template does not render conversations incrementally; cannot mask prompts")
        prompt_ids = _encode(tokenizer, prompt[len(rendered) :])
        reply_ids = _encode(tokenizer, full[len(prompt) :])
        if eos in reply_ids:
            cut = reply_ids.index(eos) + 1
        else:  # the template closes turns without EOS: add it, or the model never learns to stop
            reply_ids = reply_ids + [eos]
            cut = len(reply_ids)
        ids += prompt_ids + reply_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + reply_ids[:cut] + [IGNORE_INDEX] * (len(reply_ids) - cut)
        rendered = full
    return Example(ids[:max_len], labels[:max_len], len(ids) > max_len, len(ids))


def tokenize_text(tokenizer: Any, text: str, max_len: int) -> Example:
    """Continued pretraining: every token trained (the first has nothing before it to
    predict it), with the tokenizer's own BOS convention and an EOS at the end."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] + ids[1:]
    return Example(ids[:max_len], labels[:max_len], len(ids) > max_len, len(ids))


def tokenize_sample(tokenizer: Any, sample: Sample, max_len: int) -> Example:
    if sample.text is not None:
        ex = tokenize_text(tokenizer, sample.text, max_len)
    else:
        ex = tokenize_conversation(tokenizer, sample.messages or [], max_len)
    ex.file, ex.row = sample.file, sample.row
    return ex


def tokenize_samples(tokenizer: Any, samples: list[Sample], max_len: int) -> tuple[list[Example | None], list[Problem]]:
    """Tokenize every sample, reporting those that are truncated (warning) or have no
    trained token left within max_len, or that the template cannot render (errors: their
    slot in the result is None)."""
    examples: list[Example | None] = []
    problems: list[Problem] = []
    for s in samples:
        try:
            ex = tokenize_sample(tokenizer, s, max_len)
        except DataError as e:
            problems.append(Problem(s.file, s.row, None, "template", str(e)))
            examples.append(None)
            continue
        if ex.n_trained == 0:
            problems.append(
                Problem(
                    s.file,
                    s.row,
                    None,
                    "nothing_to_train",
                    f"no reply token within max_seq_len={max_len} (the row has {ex.full_length} tokens); "
                    "shorten the prompt or raise max_seq_len",
                    ERROR,
                )
            )
            examples.append(None)
            continue
        if ex.truncated:
            problems.append(
                Problem(
                    s.file,
                    s.row,
                    None,
                    "too_long",
                    f"{ex.full_length} tokens, longer than max_seq_len={max_len}: the last "
                    f"{ex.full_length - max_len} are cut",
                    WARNING,
                )
            )
        examples.append(ex)
    return examples, problems


def tokenize_all(tokenizer: Any, conversations: list[list[Message]], max_len: int) -> list[Example]:
    """Conversations -> examples, leaving out those with no trained token within max_len."""
    examples = [tokenize_conversation(tokenizer, conv, max_len) for conv in conversations]
    kept = [e for e in examples if e.n_trained > 0]
    if not kept:
        raise DataError(f"no sample has a trained token within max_seq_len={max_len}; raise max_seq_len")
    return kept
