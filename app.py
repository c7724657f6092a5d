"""LoRA Studio web app. Launch: `.venv/bin/python app.py` (http://127.0.0.1:7860).

Settings come from environment variables (see lora_studio/ui/settings.py), which a Space sets
in its settings; flags here override them for local use.

    python app.py                          local mode, this machine only (127.0.0.1)
    python app.py --host 0.0.0.0           local mode, open to the network: everyone is the operator
    python app.py --mode public            a shared server: each visitor owns their runs, limits hold
    LORA_STUDIO_MODE=public / SPACE_ID set public mode without the flag (a Space is public)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_studio.ui import AppSettings, launch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LoRA Studio web app")
    parser.add_argument(
        "--mode", choices=["local", "public"],
        help="local: one person, the operator; public: anonymous visitors, each owning their runs "
        "(env LORA_STUDIO_MODE; default public where SPACE_ID is set, else local)",
    )  # fmt: skip
    parser.add_argument("--runs-dir", help="folder for run folders (env LORA_STUDIO_RUNS_DIR, default ./runs)")
    parser.add_argument("--model", help="model preselected for training: bundled, a Hub id or a folder")
    parser.add_argument(
        "--host", help="interface to listen on (env GRADIO_SERVER_NAME; default 127.0.0.1 in local mode, "
        "0.0.0.0 in public mode)",
    )  # fmt: skip
    parser.add_argument("--port", type=int, help="port (env GRADIO_SERVER_PORT, default 7860)")
    args = parser.parse_args(argv)
    try:
        settings = AppSettings.from_env(mode=args.mode)
    except ValueError as e:
        parser.error(str(e))
    if args.runs_dir:
        settings.runs_dir = Path(args.runs_dir)
    if args.model:
        settings.model = args.model
    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    launch(settings)


if __name__ == "__main__":
    main()
