"""Export tab: the adapter as a zip, a merged model, a GGUF file (llama.cpp, Ollama), a push to the Hub, and the model card.
Only the caller's own runs. A push uses the visitor's own token (signed in, or typed); in
public mode never the server's HF_TOKEN, and only into the token owner's namespace."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import gradio as gr

from lora_studio import cards, export, runfiles as rf
from lora_studio.ui.common import Studio, friendly, run_picker


def _offer(files: list[Path]) -> list[Path]:
    """The files linked into a temporary folder gradio serves from: the run folder is not served,
    and a hard link costs no second copy of a big GGUF on disk (a copy only across filesystems)."""
    folder = Path(tempfile.mkdtemp(prefix="lora-studio-gguf-"))
    out = []
    for f in files:
        target = folder / f.name
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
        out.append(target)
    return out


def build_export_tab(studio: Studio) -> None:
    with gr.Tab("Export", id="export") as tab:
        run = run_picker(studio, tab, "export-run")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Adapter (PEFT format)\nLoads with `PeftModel.from_pretrained`, vLLM or TGI.")
                zip_button = gr.Button("Build adapter zip", variant="primary", elem_id="export-zip")
                zip_file = gr.File(label="Adapter zip", elem_id="export-zip-file", interactive=False)
            with gr.Column():
                gr.Markdown("### Merged model\nThe adapter folded into the base weights: a plain transformers model.")
                merge_button = gr.Button("Save merged model", elem_id="export-merge")
                merged_zip = gr.Checkbox(label="Also offer it as a zip download (large)", value=False)
                merged_info = gr.Markdown(elem_id="export-merge-info")
                merged_file = gr.File(label="Merged model zip", interactive=False, height=90)
        with gr.Row():
            with gr.Column():
                gr.Markdown(
                    "### GGUF (llama.cpp, Ollama, LM Studio)\nThe merged model as one file, with an Ollama "
                    "`Modelfile` and a README; Llama, Mistral, Qwen2/3 and Gemma 2/3 bases."
                )
                with gr.Row():
                    quant = gr.Radio(["f16", "bf16", "q8_0"], value="f16", label="Tensor type", elem_id="export-gguf-quant")
                    gguf_button = gr.Button("Build GGUF", elem_id="export-gguf")
                gguf_info = gr.Markdown(elem_id="export-gguf-info")
                gguf_files = gr.File(label="GGUF, Modelfile, README", file_count="multiple", interactive=False, elem_id="export-gguf-file")
        with gr.Accordion("Push to the Hugging Face Hub", open=False):
            with gr.Row():
                repo = gr.Textbox(label="Repository (user/name)", elem_id="hub-repo")
                token = gr.Textbox(
                    label=(
                        "Your token (write access; empty = the account you signed in with)"
                        if studio.settings.public else "Token (write access; empty = use HF_TOKEN)"
                    ),
                    type="password",
                    elem_id="hub-token",
                )
            with gr.Row():
                kind = gr.Radio(["adapter", "merged"], value="adapter", label="What to push")
                private = gr.Checkbox(label="Private repository", value=True)
                push = gr.Button("Push", elem_id="hub-push")
            push_info = gr.Markdown(elem_id="hub-result")
        with gr.Accordion("Model card", open=False):
            card = gr.Code(language="markdown", label="README.md", elem_id="export-card", interactive=False)

        @friendly
        def build_zip(run_id, request: gr.Request):
            path = export.zip_adapter(studio.run_dir(run_id, studio.caller(request), need_adapter=True))
            return str(path)

        @friendly
        def merge(run_id, offer_zip, request: gr.Request):
            run_dir = studio.run_dir(run_id, studio.caller(request), need_adapter=True)
            out = export.save_merged(run_dir, allow_remote_code=studio.settings.allow_remote_code and not studio.settings.public)
            note = f"Merged model saved as `{out.name}` in the run folder." if studio.settings.public else f"Merged model saved to `{out}`."
            return note, (str(export.zip_folder(out)) if offer_zip else None)

        @friendly
        def build_gguf(run_id, quant_type, request: gr.Request, progress=gr.Progress()):
            run_dir = studio.run_dir(run_id, studio.caller(request), need_adapter=True)
            path = export.export_gguf(
                run_dir, run_dir / "gguf", quant_type,
                allow_remote_code=studio.settings.allow_remote_code and not studio.settings.public,
                progress=lambda fraction, what: progress(fraction, desc=what),
            )  # fmt: skip
            size = path.stat().st_size / 2**20
            note = f"`{path.name}` ({size:.0f} MiB), with `Modelfile` and `README.md` beside it."
            return note, [str(p) for p in _offer([path, path.parent / "Modelfile", path.parent / "README.md"])]

        def push_run(run_id, repo_id, typed_token, what, is_private, request: gr.Request):
            caller = studio.caller(request)
            try:
                run_dir = studio.run_dir(run_id, caller, need_adapter=True)
                typed = (typed_token or "").strip()
                if studio.settings.public:
                    # The visitor's own token only: typed, else the account they signed in with.
                    url = export.push_to_hub(
                        run_dir, repo_id, typed or caller.hub_token, kind=what, private=is_private,
                        use_env_token=False, own_namespace=True,
                    )
                else:
                    url = export.push_to_hub(run_dir, repo_id, typed, kind=what, private=is_private)
            except (ValueError, FileNotFoundError, export.HubError, gr.Error) as e:
                # The field is cleared either way: the token is never sent back to the page.
                return "", f"**Push failed:** {getattr(e, 'message', None) or e}"
            return "", f"Pushed the {what} to [{url}]({url})."

        @friendly
        def show_card(run_id, request: gr.Request):
            if not run_id:
                return ""
            run_dir = studio.run_dir(run_id, studio.caller(request))
            if not rf.has_adapter(run_dir):
                return ""
            return cards.model_card(run_dir, "adapter")

        zip_button.click(build_zip, run, zip_file, api_name="export_zip")
        merge_button.click(merge, [run, merged_zip], [merged_info, merged_file], api_name="export_merged")
        gguf_button.click(build_gguf, [run, quant], [gguf_info, gguf_files], api_name="export_gguf")
        push.click(push_run, [run, repo, token, kind, private], [token, push_info], api_name="push_to_hub")
        run.change(show_card, run, card, api_name="model_card")
