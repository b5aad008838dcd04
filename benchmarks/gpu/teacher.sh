#!/usr/bin/env bash
# Teacher scoring on one GPU: the in-process hf teacher against a served vLLM teacher (benchmarks.teacher), bf16.
#
#   MMOPD_VLLM_PYTHON=/path/to/vllm-venv/bin/python benchmarks/gpu/teacher.sh [MODEL_DIR]
#
# MODEL_DIR: a causal LM checkpoint (default: the benchmark's random Qwen3). The vLLM venv needs vLLM's CUDA build;
# the server (40% of the GPU) and the hf teacher share the GPU.
# Not run in this project: no GPU was lent to the task that wrote it (see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MMOPD_VLLM_PYTHON:?set MMOPD_VLLM_PYTHON to the python of a venv with vLLM (CUDA build)}"
model=()
if [[ $# -ge 1 ]]; then model=(--model "$1"); fi
for batch in 16 64; do
  python -m benchmarks.teacher --device cuda --dtype bfloat16 --batch "$batch" --prompt-len 128 --response-len 256 \
    --top-k 20 --reps 5 "${model[@]}"
done
