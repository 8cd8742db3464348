#!/usr/bin/env bash
# Creates .venv (idempotent) and installs the project with its test extras.
# torch goes in first, pinned to the CPU wheel, so no resolver step can pull CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AIM_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
