"""Compare tab: base (left) and tuned (right) answer the same message, streamed; a blind A/B
mode with a vote tally; a batch mode that answers a prompt file and offers a CSV. Only the
caller's own runs; prompt length, reply length and batch size within the server's limits."""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import pandas as pd

from lora_studio import runfiles as rf
from lora_studio.chat import describe_votes, heldout_prompts, read_votes, record_vote
from lora_studio.compare import GenerationSettings, read_prompts
from lora_studio.ui.common import Studio, friendly, plain_messages, run_picker
from lora_studio.ui.identity import Caller

BATCH_COLUMNS = ["prompt", "base", "tuned"]


def _settings(studio: Studio, temperature: float, top_p: float, max_tokens: float) -> GenerationSettings:
    cap = studio.settings.limits.new_tokens
    if cap and int(max_tokens) > cap:
        raise ValueError(f"max new tokens: {int(max_tokens)} is over this server's limit of {cap} (LORA_STUDIO_MAX_NEW_TOKENS)")
    return GenerationSettings(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))


def _check_prompt(studio: Studio, text: str, what: str = "message") -> None:
    cap = studio.settings.limits.prompt_chars
    if cap and len(text) > cap:
        raise ValueError(
            f"the {what} is {len(text):,} characters, over this server's limit of {cap:,} (LORA_STUDIO_MAX_PROMPT_CHARS)"
        )


@friendly
def _run_defaults(studio: Studio, run_id: str | None, caller: Caller) -> tuple[Any, Any, Any, str]:
    """Generation settings saved with the run (where it has them) and a line about the run."""
    if not run_id:
        return gr.update(), gr.update(), gr.update(), "No run picked: train one in the Train tab first."
    run = studio.run_dir(run_id, caller)
    from lora_studio.adapters import read_adapter_record

    if not rf.has_adapter(run):
        return gr.update(), gr.update(), gr.update(), f"Run {run_id} has no adapter yet."
    adapter = rf.adapter_dir(run)
    record = read_adapter_record(adapter)
    gen = record.get("generation") or {}
    info = (
        f"Run **{run_id}**: {record.get('method', '?')} on `{record.get('base_model', '?')}`, "
        f"adapter at step {record.get('step', '?')}. Chat template and system prompt are the run's own."
    )
    return (
        gr.update(value=gen["temperature"]) if "temperature" in gen else gr.update(),
        gr.update(value=gen["top_p"]) if "top_p" in gen else gr.update(),
        gr.update(value=gen["max_new_tokens"]) if "max_new_tokens" in gen else gr.update(),
        info,
    )


def build_compare_tab(studio: Studio) -> None:
    with gr.Tab("Compare", id="compare") as tab:
        run = run_picker(studio, tab, "compare-run", api_name="compare_runs")
        run_info = gr.Markdown()
        with gr.Accordion("Generation settings", open=False):
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                cap = studio.settings.limits.new_tokens
                max_tokens = gr.Slider(
                    8, cap or 1024, value=min(128, cap or 128), step=8,
                    label=f"Max new tokens (at most {cap} on this server)" if cap else "Max new tokens",
                )
        gen_inputs = [temperature, top_p, max_tokens]
        with gr.Tabs():
            with gr.Tab("Side by side", id="compare-chat"):
                _side_by_side(studio, run, gen_inputs)
            with gr.Tab("Blind A/B", id="compare-blind"):
                _blind(studio, run, gen_inputs)
            with gr.Tab("Batch", id="compare-batch"):
                _batch(studio, run, gen_inputs)

        def defaults(r, request: gr.Request):
            return _run_defaults(studio, r, studio.caller(request))

        run.change(defaults, run, [*gen_inputs, run_info], api_visibility="undocumented")


def _side_by_side(studio: Studio, run: gr.Dropdown, gen_inputs: list[gr.Slider]) -> None:
    with gr.Row():
        base = gr.Chatbot(label="Base model (adapter off)", elem_id="chat-base", height=380)
        tuned = gr.Chatbot(label="Tuned model (adapter on)", elem_id="chat-tuned", height=380)
    with gr.Row():
        message = gr.Textbox(
            label="Message", placeholder="Ask both models…", elem_id="chat-input", scale=5, lines=1
        )
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        clear = gr.Button("Clear", elem_id="chat-clear", scale=1)

    @friendly

    def chat(run_id, text, base_hist, tuned_hist, temperature, top_p, max_tokens, request: gr.Request) -> Iterator[tuple]:
        if not (text or "").strip():
            raise gr.Error("Type a message first.")
        run_dir = studio.run_dir(run_id, studio.caller(request), need_adapter=True)
        settings = _settings(studio, temperature, top_p, max_tokens)
        _check_prompt(studio, text)
        histories = [list(base_hist or []), list(tuned_hist or [])]
        # The histories come from the caller too: the whole conversation counts toward the limit.
        _check_prompt(studio, text + "".join(m["content"] for h in histories for m in plain_messages(h)), "conversation")
        for history in histories:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        yield "", histories[0], histories[1]
        # One model, adapter off then on: the base streams first, then the tuned reply.
        for side, is_tuned in ((0, False), (1, True)):
            prompt = plain_messages(histories[side][:-1])
            for reply in studio.chat.stream(run_dir, prompt, tuned=is_tuned, settings=settings):
                histories[side][-1] = {"role": "assistant", "content": reply}
                yield "", histories[0], histories[1]

    event = dict(
        fn=chat,
        inputs=[run, message, base, tuned, *gen_inputs],
        outputs=[message, base, tuned],
        concurrency_id="model",
        concurrency_limit=1,
    )
    send.click(**event, api_name="chat")
    message.submit(**event, api_visibility="undocumented")
    clear.click(lambda: ([], []), None, [base, tuned], queue=False, api_visibility="undocumented")
    run.change(lambda: ([], []), None, [base, tuned], queue=False, api_visibility="undocumented")


def _blind(studio: Studio, run: gr.Dropdown, gen_inputs: list[gr.Slider]) -> None:
    gr.Markdown(
        "Both models answer; the sides are shuffled for every prompt and hidden until you vote. "
        "The tally is kept with the run."
    )
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", elem_id="blind-input", scale=5)
        ask = gr.Button("Ask both", variant="primary", elem_id="blind-ask", scale=1)
    with gr.Row():
        reply_a = gr.Textbox(label="Model A", lines=6, elem_id="blind-a", interactive=False)
        reply_b = gr.Textbox(label="Model B", lines=6, elem_id="blind-b", interactive=False)
    with gr.Row():
        vote_a = gr.Button("A is better", elem_id="vote-a")
        vote_tie = gr.Button("Tie", elem_id="vote-tie")
        vote_b = gr.Button("B is better", elem_id="vote-b")
    verdict = gr.Markdown(elem_id="blind-verdict")
    tally = gr.Markdown(elem_id="blind-tally")
    tuned_side = gr.State(None)  # "A" or "B" for the pending prompt; None once voted

    @friendly

    def ask_both(run_id, text, temperature, top_p, max_tokens, request: gr.Request):
        if not (text or "").strip():
            raise gr.Error("Type a prompt first.")
        run_dir = studio.run_dir(run_id, studio.caller(request), need_adapter=True)
        settings = _settings(studio, temperature, top_p, max_tokens)
        _check_prompt(studio, text, "prompt")
        side = random.choice("AB")
        replies = {}
        for is_tuned in (False, True):
            messages = [{"role": "user", "content": text}]
            replies[is_tuned] = studio.chat.reply(run_dir, messages, tuned=is_tuned, settings=settings)
        a, b = (replies[True], replies[False]) if side == "A" else (replies[False], replies[True])
        return a, b, side, "Which answer is better?"

    @friendly

    def vote(run_id, side, choice, caller: Caller):
        run_dir = studio.run_dir(run_id, caller, need_adapter=True)  # first: another's run is just "not found"
        if side is None:
            raise gr.Error("Ask a prompt first; each answer pair takes one vote.")
        winner = "tie" if choice == "tie" else ("tuned" if choice == side else "base")
        counts = record_vote(run_dir, winner)
        reveal = f"Model {side} was the **tuned** model; the other was the base."
        return None, reveal, describe_votes(counts)

    ask.click(
        ask_both,
        [run, prompt, *gen_inputs],
        [reply_a, reply_b, tuned_side, verdict],
        api_name="blind_ask",
        concurrency_id="model",
        concurrency_limit=1,
    )
    def voter(choice: str):
        def cast(run_id, side, request: gr.Request):
            return vote(run_id, side, choice, studio.caller(request))

        return cast

    for button, choice in ((vote_a, "A"), (vote_b, "B"), (vote_tie, "tie")):
        button.click(voter(choice), [run, tuned_side], [tuned_side, verdict, tally], api_name=f"vote_{choice.lower()}")

    @friendly
    def show_tally(run_id, request: gr.Request):
        return describe_votes(read_votes(studio.run_dir(run_id, studio.caller(request)))) if run_id else ""

    run.change(show_tally, run, tally, api_visibility="undocumented")


def _batch(studio: Studio, run: gr.Dropdown, gen_inputs: list[gr.Slider]) -> None:
    gr.Markdown(
        "Upload prompts (JSONL with a `prompt` field, or plain text with one prompt per line), "
        "or answer the run's validation rows (with their reference replies)."
    )
    with gr.Row():
        prompts_file = gr.File(label="Prompts", file_types=[".jsonl", ".txt"], elem_id="batch-prompts")
        with gr.Column():
            source = gr.Radio(
                [("uploaded prompts", "upload"), ("the run's validation rows", "validation")],
                value="upload",
                label="Answer",
                elem_id="batch-source",
            )
            go = gr.Button("Answer all", variant="primary", elem_id="batch-run")
            score = gr.Button("Score (exact match, F1, ROUGE-L)", elem_id="batch-score")
    scores = gr.Markdown(elem_id="batch-scores")
    table = gr.Dataframe(headers=BATCH_COLUMNS, label="Base vs tuned", wrap=True, elem_id="batch-table")
    csv = gr.File(label="CSV", elem_id="batch-csv", interactive=False, height=90)

    @friendly
    def run_batch(run_id, path, which, temperature, top_p, max_tokens, request: gr.Request):
        run_dir = studio.run_dir(run_id, studio.caller(request), need_adapter=True)
        settings = _settings(studio, temperature, top_p, max_tokens)
        items = _batch_items(studio, run_dir, which, path, lambda f: [{"prompt": p} for p in read_prompts(f)],
                             "Upload a prompts file first (or answer the run's validation rows).")
        columns = ["prompt", *(["reference"] if "reference" in items[0] else []), "base", "tuned"]
        rows: list[dict[str, str]] = []
        for item in items:
            row = dict(item)
            for key, is_tuned in (("base", False), ("tuned", True)):
                messages = [{"role": "user", "content": item["prompt"]}]
                row[key] = studio.chat.reply(run_dir, messages, tuned=is_tuned, settings=settings)
            rows.append(row)
            yield pd.DataFrame(rows, columns=columns), None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(tempfile.mkdtemp(prefix="lora-studio-batch-")) / f"{run_id}-compare-{stamp}.csv"
        pd.DataFrame(rows, columns=columns).to_csv(out, index=False)
        yield pd.DataFrame(rows, columns=columns), str(out)

    @friendly
    def run_score(run_id, path, which, temperature, top_p, max_tokens, request: gr.Request):
        """Greedy replies of base and tuned to rows with references, scored (lora_studio.evaluate);
        the file's rows are in any training format (prompt, then the reference reply)."""
        from lora_studio.evaluate import evaluate_model, reference_rows, summarize

        run_dir = studio.run_dir(run_id, studio.caller(request), need_adapter=True)
        settings = _settings(studio, 0.0, 1.0, max_tokens)  # scores are of greedy replies
        items = _batch_items(studio, run_dir, which, path, reference_rows,
                             "Upload rows with reference replies first (or score the run's validation rows).")
        with studio.chat.using(run_dir) as tm:
            scored = evaluate_model(tm, items, settings)
        s = summarize(scored)
        text = "| | exact match | token F1 | ROUGE-L |\n|---|---|---|---|\n" + "".join(
            f"| {who} | {s[who]['exact_match']:.3f} | {s[who]['f1']:.3f} | {s[who]['rougeL']:.3f} |\n" for who in ("base", "tuned")
        ) + f"\n{s['n']} rows, greedy, at most {settings.max_new_tokens} new tokens."
        rows = [{"prompt": r["prompt"], "reference": r["reference"], "base": r["base"], "tuned": r["tuned"],
                 "tuned ROUGE-L": round(r["tuned_scores"]["rougeL"], 3)} for r in scored]  # fmt: skip
        return text, pd.DataFrame(rows)

    score.click(
        run_score, [run, prompts_file, source, *gen_inputs], [scores, table], api_name="score",
        concurrency_id="model", concurrency_limit=1,
    )  # fmt: skip
    go.click(
        run_batch,
        [run, prompts_file, source, *gen_inputs],
        [table, csv],
        api_name="batch",
        concurrency_id="model",
        concurrency_limit=1,
    )


def _batch_items(studio: Studio, run_dir: Path, which: str, path: str | None, read: Any, missing: str) -> list[dict[str, str]]:
    """The rows a batch answers (the run's validation rows, or the uploaded file read by `read`),
    held to the server's batch and prompt limits."""
    if which == "validation":
        config = json.loads((run_dir / "config.json").read_text())
        items = heldout_prompts(run_dir, studio.tokenizer(config.get("model", "bundled")))
    elif path:
        items = read(path)
    else:
        raise ValueError(missing)
    cap = studio.settings.limits.batch_prompts
    if cap and len(items) > cap:
        raise ValueError(f"{len(items)} prompts is over this server's limit of {cap} per batch (LORA_STUDIO_MAX_BATCH_PROMPTS)")
    for item in items:
        _check_prompt(studio, item["prompt"], "prompt")
    return items
