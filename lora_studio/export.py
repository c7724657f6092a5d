"""Exports of a finished run: the adapter as a zip (PEFT format), a merged full model, a
push to the Hugging Face Hub, each with its model card (cards.py). A Hub token is used for the one
call that needs it and never written anywhere: not in the card, the run folder or a message.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from lora_studio.adapters import read_adapter_record
from lora_studio.cards import gguf_lora_readme, gguf_readme, model_card
from lora_studio.runfiles import adapter_dir, atomic_dir

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "lora_studio.json")


def zip_adapter(run_dir: str | Path, dest_dir: str | Path | None = None) -> Path:
    """`<run>-adapter.zip` holding one folder with the PEFT files, our record and the model card."""
    run_dir = Path(run_dir)
    src = adapter_dir(run_dir)
    dest = Path(dest_dir or tempfile.mkdtemp(prefix="lora-studio-export-"))
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{run_dir.name}-adapter.zip"
    tmp = out.with_name("." + out.name + ".tmp")
    folder = f"{run_dir.name}-adapter"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ADAPTER_FILES:
            if (src / name).exists():
                zf.write(src / name, f"{folder}/{name}")
        zf.writestr(f"{folder}/README.md", model_card(run_dir, "adapter"))
    tmp.replace(out)
    return out


def load_merged(run_dir: str | Path, allow_remote_code: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """The run's base with its adapter folded in (in place: one copy of the model), its tokenizer
    carrying the run's chat template, and the adapter record. Shared by every merged export.

    `allow_remote_code=False` (the web app unless its operator allowed it): a run whose base
    needs its repo's own code is refused rather than run.
    """
    from lora_studio.adapters import load_adapter
    from lora_studio.methods import merge_adapters
    from lora_studio.models import load_model, load_tokenizer

    run_dir = Path(run_dir)
    src = adapter_dir(run_dir)
    record = read_adapter_record(src)
    spec = record.get("base_model") or record["settings"].get("model", "bundled")
    trust = bool(record["settings"].get("trust_remote_code", False))
    if trust and not allow_remote_code:
        raise ValueError(f"run {run_dir.name} was trained with trust_remote_code, which this server does not allow")
    tokenizer = load_tokenizer(spec, trust)
    if record.get("chat_template"):
        tokenizer.chat_template = record["chat_template"]
    model = load_model(spec, trust_remote_code=trust)
    load_adapter(model, src)
    merge_adapters(model)
    return model, tokenizer, record


def save_merged(run_dir: str | Path, out_dir: str | Path | None = None, allow_remote_code: bool = True) -> Path:
    """Fold the adapter into a full-precision copy of the base and save it (default RUN/merged).

    A 4-bit (QLoRA) run is merged into the base loaded in full precision, as usual for QLoRA.
    """
    from lora_studio.engine.run import merge_into_base

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "merged"
    model, tokenizer, _ = load_merged(run_dir, allow_remote_code)
    with atomic_dir(out, prefix=".merged-") as tmp:
        merge_into_base(model, tokenizer, tmp)
        (tmp / "README.md").write_text(model_card(run_dir, "merged"))
    return out


def export_adapter(run_dir: str | Path, out: str | Path) -> Path:
    """The adapter headless: `out` ending in .zip gets the Export tab's zip, else a folder of PEFT files + card."""
    run_dir, out = Path(run_dir), Path(out)
    if out.suffix == ".zip":
        made = zip_adapter(run_dir, out.parent)
        return made if made == out else made.replace(out)
    src = adapter_dir(run_dir)
    with atomic_dir(out, prefix=".adapter-") as tmp:
        for name in ADAPTER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        (tmp / "README.md").write_text(model_card(run_dir, "adapter"))
    return out


def gguf_path(run_dir: str | Path, out: str | Path | None, quant: str) -> Path:
    """Where a GGUF export goes: `out` itself when it names a .gguf file, else `<run>.<quant>.gguf` in the
    folder `out` (default RUN/gguf)."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "gguf"
    return out if out.suffix == ".gguf" else out / f"{run_dir.name}.{quant}.gguf"


def export_gguf(
    run_dir: str | Path,
    out: str | Path | None = None,
    quant: str = "f16",
    allow_remote_code: bool = True,
    progress: Any = None,
) -> Path:
    """The merged model as one GGUF file, with an Ollama `Modelfile` and a README beside it.

    The family is checked before anything is loaded; the merge happens in the loaded base (one
    copy in memory) and the file is streamed from it, so no merged folder is written first.
    """
    from lora_studio import gguf_export
    from lora_studio.models import base_model_id, resolve_model_path

    run_dir = Path(run_dir)
    if quant not in gguf_export.QUANTS:
        raise ValueError(f"--quant must be one of {', '.join(gguf_export.QUANTS)} (got {quant!r})")
    record = read_adapter_record(adapter_dir(run_dir))
    spec = record.get("base_model") or record["settings"].get("model", "bundled")
    if not record["settings"].get("trust_remote_code"):
        from transformers import AutoConfig

        gguf_export.gguf_arch(AutoConfig.from_pretrained(resolve_model_path(spec)))  # refuse before loading
    path = gguf_path(run_dir, out, quant)
    if progress:
        progress(0.0, "loading the base and merging the adapter")
    model, tokenizer, record = load_merged(run_dir, allow_remote_code)

    def step(fraction: float, what: str) -> None:
        if progress:
            progress(0.1 + 0.9 * fraction, what)

    gguf_export.write_gguf(
        model, tokenizer, path, quant, name=run_dir.name, base_id=base_model_id(spec),
        chat_template=record.get("chat_template"), progress=step,
    )  # fmt: skip
    (path.parent / "Modelfile").write_text(
        gguf_export.modelfile(path.name, tokenizer, record.get("generation") or {}, record.get("system_prompt"))
    )
    (path.parent / "README.md").write_text(gguf_readme(run_dir, path, quant, base_model_id(spec)))
    return path


def export_gguf_lora(run_dir: str | Path, out: str | Path | None = None, quant: str = "f16", progress: Any = None) -> Path:
    """The run's adapter as a GGUF LoRA adapter for llama.cpp / Ollama (`<run>-lora.<quant>.gguf` in `out`,
    default RUN/gguf-lora, or `out` itself when it names a .gguf file), with a README on how to apply it.

    Only the adapter is read: no base weights are loaded, just the base's config for its tensor names.
    DoRA, VeRA and other non-plain-LoRA runs are refused before anything is written.
    """
    from transformers import AutoConfig

    from lora_studio import gguf_lora
    from lora_studio.models import base_model_id, resolve_model_path

    run_dir = Path(run_dir)
    src = adapter_dir(run_dir)
    gguf_lora.lora_pairs(src)  # refuse a DoRA / VeRA run before touching the base
    record = read_adapter_record(src)
    spec = record.get("base_model") or record["settings"].get("model", "bundled")
    config = AutoConfig.from_pretrained(resolve_model_path(spec))
    target = Path(out) if out else run_dir / "gguf-lora"
    path = target if target.suffix == ".gguf" else target / f"{run_dir.name}-lora.{quant}.gguf"
    gguf_lora.write_gguf_lora(src, config, path, quant, name=f"{run_dir.name} (LoRA)", base_id=base_model_id(spec),
                              progress=progress)  # fmt: skip
    (path.parent / "README.md").write_text(gguf_lora_readme(run_dir, path, base_model_id(spec)))
    return path


EXPORT_FORMATS = ("adapter", "merged", "gguf", "gguf-lora")


def export_run(
    run_dir: str | Path, fmt: str, out: str | Path, quant: str = "f16", allow_remote_code: bool = True,
    progress: Any = None,
) -> Path:
    """What the Export tab builds, headless: `adapter`, `merged`, `gguf` or `gguf-lora`."""
    if fmt == "adapter":
        return export_adapter(run_dir, out)
    if fmt == "merged":
        return save_merged(run_dir, out, allow_remote_code)
    if fmt == "gguf":
        return export_gguf(run_dir, out, quant, allow_remote_code, progress)
    if fmt == "gguf-lora":
        return export_gguf_lora(run_dir, out, quant, progress)
    raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})")


def zip_folder(folder: str | Path, dest_dir: str | Path | None = None) -> Path:
    folder = Path(folder)
    dest = Path(dest_dir or tempfile.mkdtemp(prefix="lora-studio-export-"))
    base = dest / folder.name
    return Path(shutil.make_archive(str(base), "zip", root_dir=folder.parent, base_dir=folder.name))


class HubError(RuntimeError):
    """A failed push, with the token (if any) removed from the message."""


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def push_to_hub(
    run_dir: str | Path,
    repo_id: str,
    token: str | None,
    kind: str = "adapter",
    private: bool = True,
    api: Any = None,
    use_env_token: bool = True,
    own_namespace: bool = False,
) -> str:
    """Create (or reuse) `repo_id` and upload the adapter or the merged model with its card.

    `token`: the one typed by the user, else (with `use_env_token`, the operator's own use) `HF_TOKEN`
    from the environment, read here so it never passes through the UI. A public app passes
    `use_env_token=False`: a visitor's push carries the visitor's token or nothing. With
    `own_namespace`, the repo must belong to the token's account (or one of its organizations),
    asked of the Hub before anything is created. Returns the repo URL.
    """
    import os

    if kind not in ("adapter", "merged"):
        raise ValueError(f"kind must be 'adapter' or 'merged' (got {kind!r})")
    repo_id = (repo_id or "").strip()
    if not repo_id or repo_id.count("/") != 1 or any(c.isspace() for c in repo_id):
        raise ValueError(f"give the Hub repo as user/name (got {repo_id!r})")
    token = (token or "").strip() or (os.environ.get("HF_TOKEN") if use_env_token else None) or None
    if not token:
        if not use_env_token:
            raise ValueError("no Hub token: sign in with Hugging Face, or type a token of yours with write access")
        raise ValueError("no Hub token: type one (write access) or set HF_TOKEN")
    run_dir = Path(run_dir)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    if own_namespace:
        try:
            who = api.whoami(token=token)
        except Exception as e:  # noqa: BLE001 - a bad token, or no Hub: one clean message
            raise HubError(_scrub(f"the Hub did not accept this token: {e}", token)) from None
        names = {who.get("name"), *(org.get("name") for org in who.get("orgs") or [])} - {None}
        if repo_id.split("/")[0] not in names:
            raise ValueError(
                f"{repo_id}: this token can push to {', '.join(sorted(names)) or 'no account'} only; "
                "name a repo of yours (your-name/repo)"
            )
    staging = Path(tempfile.mkdtemp(prefix="lora-studio-push-"))
    try:
        if kind == "adapter":
            src = adapter_dir(run_dir)
            for name in ADAPTER_FILES:
                if (src / name).exists():
                    shutil.copy2(src / name, staging / name)
            (staging / "README.md").write_text(model_card(run_dir, "adapter", repo_id))
            folder = staging
        else:
            folder = run_dir / "merged"
            if not (folder / "config.json").exists():
                raise FileNotFoundError("save the merged model first (it goes to RUN/merged)")
            (folder / "README.md").write_text(model_card(run_dir, "merged", repo_id))
        try:
            url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                token=token,
                commit_message=f"LoRA Studio: {kind} from run {run_dir.name}",
            )
        except Exception as e:  # noqa: BLE001 - any Hub failure becomes one clean message
            raise HubError(_scrub(f"push to {repo_id} failed: {e}", token)) from None
        return str(url)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
