#!/usr/bin/env bash
# Sets everything up, builds the small default model, and serves it over gRPC on 127.0.0.1:50051
# (metrics on :9464/metrics). Once the server is up it sends one streamed demo request (a sample video, the
# model's default AIM plan) with the CLI client and prints the answer and its stats; then it keeps serving until
# Ctrl-C or SIGTERM, which drain in-flight requests first.
#
# Until the trained reference model (issue 3) exists, the default model is a tiny *randomly initialised*
# LLaVA-OneVision: its answers are noise; its token, FLOPs and latency accounting is real.
set -euo pipefail
cd "$(dirname "$0")/.."
AIM_SKIP_TOOLS=1 bash scripts/setup.sh
. "${AIM_VENV:-.venv}/bin/activate"
MODEL=${AIM_MODEL:-models/tiny-llava-onevision}
PORT=${AIM_PORT:-50051}
if [ ! -f "$MODEL/config.json" ]; then
  # 16 layers x 512 wide: small enough for CPU, LLM-heavy enough that AIM's saving shows in the timings
  aim-serve build-tiny --family llava_onevision --layers 16 --hidden 512 --out "$MODEL" >/dev/null
fi
aim-serve sample-media --out build/samples >/dev/null

aim-serve serve --model "$MODEL" --port "$PORT" "$@" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER; exit $?' INT TERM
for _ in $(seq 1 120); do
  if aim-serve info --target "127.0.0.1:$PORT" --timeout 2 >/dev/null 2>&1; then break; fi
  kill -0 $SERVER 2>/dev/null || { echo "the server exited" >&2; exit 1; }
  sleep 0.5
done
echo "--- demo request: aim-serve stream --target 127.0.0.1:$PORT --video build/samples/sample.mp4 ..."
aim-serve stream --target "127.0.0.1:$PORT" --video build/samples/sample.mp4 --frames 8 \
  --prompt "Where does the red square move?" --max-new-tokens 16 --aim-default
echo "--- serving on 127.0.0.1:$PORT (Ctrl-C to stop)"
wait $SERVER
