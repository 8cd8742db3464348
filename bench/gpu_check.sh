#!/usr/bin/env bash
# The GPU check: one command, well inside 8 minutes on one H100/H200; random-weight models built from configs, no
# download. Run from the repository root on the GPU machine, after `bash bench/gpu_deps.sh` here:
#     device run: bash bench/gpu_check.sh     (carry: .gpu-deps; results under $OUT)
# 1. exactness in CUDA bf16: the empty plan against transformers' generate, batched decoding against each
#    request alone, and sliced prefill against unsliced (the CPU suite's own tests, on the GPU, tolerance by
#    dtype); then a decode step's host work with the KV pool on the GPU, before and after the persistent batch
#    (bench/engine_step.py --part host: the CPU time to launch a step, which must stay about 1 ms at 32 x 2000);
# 2. the LLM prefill benchmark on LLaVA-OneVision-7B's architecture at 32 frames (plans interleaved);
# 3. the batching benchmark on it: batched vs one at a time, no reduction vs the AIM default.
# `bash bench/gpu_check.sh families` runs instead the prefill benchmark on the 2026 families' real configs
# (Qwen3-VL-8B at 32 frames, InternVL3-2B at 32 frames, Gemma-3-4B at 8 images), well inside 8 minutes too: a
# second call, for a session with device time left after the first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=/tmp/aim-gpu-site
if ls .gpu-deps/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target "$SITE" .gpu-deps/*.whl
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.txt"
start=$(date +%s)

if [ "${1:-}" = families ]; then
  for run in "qwen3-vl-8b 32" "internvl3-2b 32" "gemma3-4b 8"; do
    set -- $run
    timeout 150 $PY bench/engine_prefill.py --arch "$1" --frames "$2" --device cuda --dtype bfloat16 --repeats 3 \
      --json-out "$OUT/engine-prefill-$1-cuda.json" 2>&1 | tail -12 | tee "$OUT/prefill-$1.log"
    echo "prefill $1: rc=${PIPESTATUS[0]} after $(( $(date +%s) - start ))s" | tee -a "$OUT/prefill-$1.log"
  done
  exit 0
fi

AIM_TEST_DEVICE=cuda AIM_TEST_DTYPE=bfloat16 timeout 180 $PY -m pytest -q -p no:cacheprovider \
  tests/engine/test_exactness.py tests/engine/test_batching.py tests/engine/test_slicing.py 2>&1 | tail -25 | tee "$OUT/exactness.log"
echo "exactness: rc=${PIPESTATUS[0]} after $(( $(date +%s) - start ))s" | tee -a "$OUT/exactness.log"

timeout 120 $PY bench/engine_step.py --part host --device cuda --host-steps 30 \
  --json-out "$OUT/engine-step-host-cuda.json" 2>&1 | tail -10 | tee "$OUT/engine-step.log"
echo "engine step host work: rc=${PIPESTATUS[0]} after $(( $(date +%s) - start ))s" | tee -a "$OUT/engine-step.log"

timeout 150 $PY bench/engine_prefill.py --arch ov-7b --frames 32 --device cuda --dtype bfloat16 --repeats 3 \
  --json-out "$OUT/engine-prefill-ov7b-cuda.json" 2>&1 | tail -20 | tee "$OUT/prefill.log"
echo "prefill: rc=${PIPESTATUS[0]} after $(( $(date +%s) - start ))s" | tee -a "$OUT/prefill.log"

timeout 180 $PY bench/engine_batching.py --arch ov-7b --frames 32 --device cuda --dtype bfloat16 \
  --workloads long short --concurrency 16 1 --requests 2 --repeats 2 \
  --json-out "$OUT/engine-batching-ov7b-cuda.json" 2>&1 | tail -20 | tee "$OUT/batching.log"
echo "batching: rc=${PIPESTATUS[0]} after $(( $(date +%s) - start ))s" | tee -a "$OUT/batching.log"
