"""Data tab: upload a file or name a Hub dataset; see the detected format (override it, map
columns), the validation summary, the first rows, samples rendered through the model's chat
template with the trained tokens marked and EOS shown, and the length histogram."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lora_studio.data import FORMATS, DataPreview, inspect_data, parse_columns
from lora_studio.data.formats import suggest_mapping
from lora_studio.data.sources import parse_hub_spec
from lora_studio.ui.common import Studio, friendly

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
STYLE = {
    "trained": "background:#c8f7c5;border-bottom:2px solid #2e9d2a;",
    "masked": "color:#777;",
    "eos": "background:#ffd966;font-weight:bold;border-radius:3px;",
}


def example_files() -> list[str]:
    if not EXAMPLES_DIR.is_dir():
        return []
    return sorted(p.name for p in EXAMPLES_DIR.iterdir() if p.suffix in DATA_SUFFIXES and "heldout" not in p.name)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?$")


def hub_source(text: str) -> str:
    """The Hub box's text as a source that can only be read from the Hub: `hub:owner/name...`.

    Refused: anything that is a path on this machine (a visitor of a public app must not read
    the server's files, nor have `datasets` load a local folder that happens to share the name)."""
    spec = parse_hub_spec(text)
    name = spec[0] if spec else ""
    bare = text.split("://", 1)[-1].removeprefix("hub:").removeprefix("datasets/")
    if (
        spec is None
        or not HUB_ID.match(name)
        or ".." in name
        or Path(name).exists()
        or Path(text).exists()
        or text.startswith(("/", ".", "~"))
        or bare.startswith(("/", ".", "~"))
    ):
        raise ValueError(
            f"{text!r} is not a Hub dataset id (owner/name[:config][@split]); "
            "to use a file of your own, upload it with the upload box"
        )
    return text if text.startswith(("hub:", "hf://")) else "hub:" + text


def render_samples(preview: DataPreview, eos_token: str | None) -> str:
    """HTML of the rendered samples: trained text green, masked text grey, EOS yellow."""
    if not preview.samples:
        return ""
    legend = (
        f'<p><span style="{STYLE["trained"]}">trained (loss)</span> · '
        f'<span style="{STYLE["masked"]}">masked (prompt, template)</span> · '
        f'<span style="{STYLE["eos"]}">EOS</span></p>'
    )
    blocks = [legend]
    eos_html = html.escape(eos_token) if eos_token else None
    for row, spans in zip(preview.sample_rows, preview.samples):
        parts = []
        for text, trained in spans:
            escaped = html.escape(text)
            if eos_html:
                escaped = escaped.replace(eos_html, f'<span class="token-eos" style="{STYLE["eos"]}">{eos_html}</span>')
            kind = "trained" if trained else "masked"
            parts.append(f'<span class="token-{kind}" style="{STYLE[kind]}">{escaped}</span>')
        ends = bool(eos_token) and any(trained and text.rstrip().endswith(eos_token) for text, trained in spans)
        check = "reply ends with a trained EOS ✓" if ends else "⚠ no trained EOS: the tuned model may never stop"
        blocks.append(
            f'<div class="data-sample"><b>row {row}</b> — {check}'
            f'<pre style="white-space:pre-wrap;font-size:0.85em">{"".join(parts)}</pre></div>'
        )
    return "\n".join(blocks)


def summary_markdown(preview: DataPreview, shown: str) -> str:
    report = preview.report
    head = "✅ ready to train" if report.ok and report.format else "❌ cannot train on this as it is"
    # The name is the visitor's own text: escaped, so it is shown, never rendered as markup.
    lines = [f"**{html.escape(shown)}** — {head}", "", "```", report.summary(), "```"]
    s = preview.stats
    if s.get("n"):
        lines.append(
            f"Tokens per row: median {s['median']:.0f}, p90 {s['p90']:.0f}, max {s['max']}; "
            f"{s['trained_tokens']} of {s['total_tokens']} tokens trained ({100 * s['trained_fraction']:.0f}%). "
            f"**{s.get('n_truncated', 0)} row(s) longer than max length {s.get('max_seq_len')}** will be truncated."
        )
    if not report.format and preview.rows is not None and len(preview.rows.columns) > 1:
        hint = suggest_mapping([c for c in preview.rows.columns if c != "row"])
        if hint:
            lines.append(f"Hint: set the format to alpaca and map the columns: `{hint}`")
    if report.errors:
        lines.append("Fix the rows listed below, or tick *Drop bad rows* in the Train tab's advanced settings.")
    return "\n".join(lines)


def histogram(preview: DataPreview) -> pd.DataFrame:
    if preview.histogram is None or not len(preview.histogram):
        return pd.DataFrame({"tokens": [], "rows": []})
    frame = preview.histogram
    return pd.DataFrame({"tokens": frame["bin_start"].astype(float), "rows": frame["count"].astype(int)})


def build_data_tab(studio: Studio, model: gr.Component, max_len: gr.Component) -> gr.State:
    """Returns the state the Train tab reads: {"data", "format", "columns", "system_prompt", "name"}."""
    with gr.Tab("Data", id="data"):
        selection = gr.State({})  # inside the tab: a State directly under gr.Tabs shifts the tab labels
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(
                    label="Upload a dataset (JSONL, JSON, CSV, TSV, Parquet)",
                    file_types=list(DATA_SUFFIXES),
                    elem_id="data-file",
                )
                example = gr.Dropdown(
                    label="…or try an example", choices=example_files(), value=None, elem_id="data-example"
                )
                hub = gr.Textbox(
                    label="…or a Hub dataset",
                    placeholder="owner/name[:config][@split]",
                    elem_id="data-hub",
                )
            with gr.Column(scale=2):
                fmt = gr.Dropdown(
                    label="Format",
                    choices=[("detect automatically", "auto"), *[(f, f) for f in FORMATS]],
                    value="auto",
                    elem_id="data-format",
                )
                columns = gr.Textbox(
                    label="Column mapping (our field = your column)",
                    placeholder="instruction=question,output=answer",
                    elem_id="data-columns",
                )
                system_prompt = gr.Textbox(label="System prompt (optional, put before every sample)", lines=2)
                check = gr.Button("Check data", variant="primary", elem_id="data-check")
        summary = gr.Markdown(elem_id="data-summary")
        problems = gr.Dataframe(label="Problems (row, field, what)", elem_id="data-problems", wrap=True, max_height=300)
        with gr.Tabs():
            with gr.Tab("Rendered samples"):
                samples = gr.HTML(elem_id="data-samples")
            with gr.Tab("First rows"):
                preview_table = gr.Dataframe(label="First rows", elem_id="data-preview", wrap=True, max_height=400)
            with gr.Tab("Lengths"):
                lengths = gr.BarPlot(
                    x="tokens", y="rows", title="Tokens per row", elem_id="data-histogram", height=280
                )

    @friendly
    def inspect(file, example_name, hub_name, format_name, mapping, system, model_name, max_seq_len):
        if file:
            shown = Path(file).name  # gradio's copy keeps the visitor's name, reduced to one component
            source = str(studio.keep_upload(file, shown))
        elif example_name:
            if example_name not in example_files():
                raise ValueError(f"no example named {example_name!r}")
            source, shown = str(EXAMPLES_DIR / example_name), example_name
        elif (hub_name or "").strip():
            source, shown = hub_source(hub_name.strip()), hub_name.strip()
        else:
            raise ValueError("Upload a file, pick an example or name a Hub dataset first.")
        cols = parse_columns(mapping or None)
        fmt_arg = None if format_name in (None, "", "auto") else format_name
        studio.check_model(model_name or studio.settings.model)  # before any file of it is read
        tokenizer = studio.tokenizer(model_name or studio.settings.model)
        preview = inspect_data(
            source,
            tokenizer,
            fmt=fmt_arg,
            columns=cols,
            system_prompt=(system or "").strip() or None,
            max_seq_len=int(max_seq_len),
            n_samples=3,
            name=shown,
        )
        spec: dict[str, Any] = {
            "data": source,
            "format": fmt_arg,
            "columns": cols,
            "system_prompt": (system or "").strip() or None,
            "name": shown,
            "ok": bool(preview.report.format) and preview.report.n_usable > 0,
            "rows": preview.report.n_usable,
            "max_tokens": min(int(preview.stats["max"]), int(max_seq_len)) if preview.stats.get("n") else None,
        }
        stats = preview.stats
        title = "Tokens per row"
        if stats.get("n"):
            title = f"Tokens per row: {stats.get('n_truncated', 0)} of {stats['n']} over max length {int(max_seq_len)}"
        problems = preview.report.problems_frame()
        if source != shown:  # a library's message may quote where the upload is stored: show the visitor's name
            problems = problems.map(lambda v: v.replace(source, shown) if isinstance(v, str) else v)
        return (
            spec,
            summary_markdown(preview, shown).replace(source, html.escape(shown)),
            problems,
            preview.rows if preview.rows is not None else pd.DataFrame(),
            render_samples(preview, getattr(tokenizer, "eos_token", None)),
            gr.BarPlot(value=histogram(preview), title=title),
        )

    settings_inputs = [fmt, columns, system_prompt, model, max_len]
    outputs = [selection, summary, problems, preview_table, samples, lengths]
    check.click(inspect, [upload, example, hub, *settings_inputs], outputs, api_name="inspect_data")
    # Picking one source uses it alone (and clears the others), whatever was picked before.
    upload.upload(
        lambda f, *rest: inspect(f, None, "", *rest), [upload, *settings_inputs], outputs,
        api_visibility="undocumented",
    )
    example.input(
        lambda e, *rest: inspect(None, e, "", *rest), [example, *settings_inputs], outputs,
        api_visibility="undocumented",
    )
    hub.submit(
        lambda h, *rest: inspect(None, None, h, *rest), [hub, *settings_inputs], outputs,
        api_visibility="undocumented",
    )
    upload.upload(lambda: (None, ""), None, [example, hub], queue=False, api_visibility="undocumented")
    example.input(lambda: (None, ""), None, [upload, hub], queue=False, api_visibility="undocumented")
    hub.submit(lambda: (None, None), None, [upload, example], queue=False, api_visibility="undocumented")
    return selection
