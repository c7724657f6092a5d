"""LoRA Studio web app. Launch: `.venv/bin/python app.py` (http://localhost:7860).

Settings come from environment variables (see lora_studio/ui/settings.py), which a Space sets
in its settings; flags here override them for local use.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_studio.ui import AppSettings, launch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LoRA Studio web app")
    parser.add_argument("--runs-dir", help="folder for run folders (env LORA_STUDIO_RUNS_DIR, default ./runs)")
    parser.add_argument("--model", help="model preselected for training: bundled, a Hub id or a folder")
    parser.add_argument("--host", help="interface to listen on (env GRADIO_SERVER_NAME, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (env GRADIO_SERVER_PORT, default 7860)")
    args = parser.parse_args(argv)
    settings = AppSettings.from_env()
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
