"""LoRA Studio web app. Launch: `.venv/bin/python app.py` (http://localhost:7860).

Until the full studio lands this page offers a chat with the bundled base model and the
list of fine-tuning methods; training runs from the CLI (`python -m lora_studio train`).
"""

from __future__ import annotations

import os

import gradio as gr

from lora_studio.methods import REGISTRY


def build_app() -> gr.Blocks:
    state: dict = {}

    def reply(prompt: str) -> str:
        import torch

        from lora_studio.models import load_model, load_tokenizer

        if "model" not in state:
            state["tok"] = load_tokenizer("bundled")
            state["model"] = load_model("bundled")
        tok, model = state["tok"], state["model"]
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=96, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown("# LoRA Studio\nFine-tune a language model from your browser. Base model: bundled SmolLM2-135M-Instruct.")
        gr.Markdown("\n".join(f"- **{m.title}** ({m.hook}): {m.summary}" for m in REGISTRY.values()))
        prompt = gr.Textbox(label="Ask the base model", elem_id="chat-input")
        answer = gr.Textbox(label="Base model", elem_id="chat-base")
        prompt.submit(reply, prompt, answer)
    return demo


if __name__ == "__main__":
    build_app().launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
