#!/usr/bin/env bash
# Sets everything up, builds the small default model and asks it about a sample video with the default
# AIM plan, printing the streamed answer and the request's stats (FLOPs saved, tokens per layer, timings).
#
# Until the trained reference model (issue 3) and the gRPC service (issue 4) land, the default model is a
# tiny randomly initialised LLaVA-OneVision: its answers are noise, its token/FLOPs accounting is real.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${AIM_VENV:-.venv}/bin/activate"
MODEL=${AIM_MODEL:-models/tiny-llava-onevision}
if [ ! -f "$MODEL/config.json" ]; then
  aim-serve build-tiny --family llava_onevision --layers 8 --out "$MODEL" >/dev/null
fi
aim-serve sample-media --out build/samples >/dev/null
exec aim-serve ask --model "$MODEL" --video build/samples/sample.mp4 --frames 8 \
  --prompt "Where does the red square move?" --plan default --max-new-tokens 16 "$@"
