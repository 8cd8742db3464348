#!/usr/bin/env bash
# Prepares what bench/gpu_check.sh needs on the GPU machine and cannot fetch there (it has no network): the
# transformers wheel this project pins (the machine's image holds an older transformers; its torch, tokenizers,
# huggingface-hub, safetensors, pillow, numpy and pytest do). Into .gpu-deps/ (git-ignored), carried by the
# device tool: run(command="bash bench/gpu_check.sh", carry=[".gpu-deps"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-deps
version=$(python3 -c "import transformers; print(transformers.__version__)" 2>/dev/null || true)
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu-deps "transformers==${version:-5.24.0}"
ls -l .gpu-deps
