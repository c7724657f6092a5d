"""Compare tab: base (left) and tuned (right) answer the same message, streamed; a blind A/B
mode with a vote tally; a batch mode that answers a prompt file and offers a CSV."""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import pandas as pd

from lora_studio.chat import describe_votes, heldout_prompts, read_votes, record_vote
from lora_studio.compare import GenerationSettings, read_prompts
from lora_studio.ui.common import Studio, friendly, plain_messages, run_picker

BATCH_COLUMNS = ["prompt", "base", "tuned"]


def _settings(temperature: float, top_p: float, max_tokens: float) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))


@friendly
def _run_defaults(studio: Studio, run_id: str | None) -> tuple[Any, Any, Any, str]:
    """Generation settings saved with the run (where it has them) and a line about the run."""
    if not run_id:
        return gr.update(), gr.update(), gr.update(), "No run picked: train one in the Train tab first."
    run = studio.run_dir(run_id)
    from lora_studio.adapters import read_adapter_record

    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").exists():
        return gr.update(), gr.update(), gr.update(), f"Run {run_id} has no adapter yet."
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
                max_tokens = gr.Slider(8, 1024, value=128, step=8, label="Max new tokens")
        gen_inputs = [temperature, top_p, max_tokens]
        with gr.Tabs():
            with gr.Tab("Side by side", id="compare-chat"):
                _side_by_side(studio, run, gen_inputs)
            with gr.Tab("Blind A/B", id="compare-blind"):
                _blind(studio, run, gen_inputs)
            with gr.Tab("Batch", id="compare-batch"):
                _batch(studio, run, gen_inputs)

        run.change(lambda r: _run_defaults(studio, r), run, [*gen_inputs, run_info], api_visibility="undocumented")


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

    def chat(run_id, text, base_hist, tuned_hist, temperature, top_p, max_tokens) -> Iterator[tuple]:
        if not (text or "").strip():
            raise gr.Error("Type a message first.")
        run_dir = studio.run_dir(run_id, need_adapter=True)
        settings = _settings(temperature, top_p, max_tokens)
        histories = [list(base_hist or []), list(tuned_hist or [])]
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

    def ask_both(run_id, text, temperature, top_p, max_tokens):
        if not (text or "").strip():
            raise gr.Error("Type a prompt first.")
        run_dir = studio.run_dir(run_id, need_adapter=True)
        settings = _settings(temperature, top_p, max_tokens)
        side = random.choice("AB")
        replies = {}
        for is_tuned in (False, True):
            messages = [{"role": "user", "content": text}]
            replies[is_tuned] = studio.chat.reply(run_dir, messages, tuned=is_tuned, settings=settings)
        a, b = (replies[True], replies[False]) if side == "A" else (replies[False], replies[True])
        return a, b, side, "Which answer is better?"

    @friendly

    def vote(run_id, side, choice):
        if side is None:
            raise gr.Error("Ask a prompt first; each answer pair takes one vote.")
        run_dir = studio.run_dir(run_id, need_adapter=True)
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
    for button, choice in ((vote_a, "A"), (vote_b, "B"), (vote_tie, "tie")):
        button.click(
            lambda r, s, c=choice: vote(r, s, c), [run, tuned_side], [tuned_side, verdict, tally],
            api_name=f"vote_{choice.lower()}",
        )
    run.change(
        lambda r: describe_votes(read_votes(studio.run_dir(r))) if r else "",
        run,
        tally,
        api_visibility="undocumented",
    )


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
    table = gr.Dataframe(headers=BATCH_COLUMNS, label="Base vs tuned", wrap=True, elem_id="batch-table")
    csv = gr.File(label="CSV", elem_id="batch-csv", interactive=False, height=90)

    @friendly
    def run_batch(run_id, path, which, temperature, top_p, max_tokens):
        run_dir = studio.run_dir(run_id, need_adapter=True)
        if which == "validation":
            config = json.loads((run_dir / "config.json").read_text())
            items = heldout_prompts(run_dir, studio.tokenizer(config.get("model", "bundled")))
        elif path:
            items = [{"prompt": p} for p in read_prompts(path)]
        else:
            raise ValueError("Upload a prompts file first (or answer the run's validation rows).")
        columns = ["prompt", *(["reference"] if "reference" in items[0] else []), "base", "tuned"]
        settings = _settings(temperature, top_p, max_tokens)
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

    go.click(
        run_batch,
        [run, prompts_file, source, *gen_inputs],
        [table, csv],
        api_name="batch",
        concurrency_id="model",
        concurrency_limit=1,
    )
