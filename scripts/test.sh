#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${AIM_VENV:-.venv}/bin/activate"
exec python -m pytest -q "$@"
