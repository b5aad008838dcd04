#!/usr/bin/env bash
# The 7B student of fsdp_oom.py on every visible GPU (at least 2), 80 GB each: DDP must run out of memory,
# FSDP must train. Exits 0 only if both happen. Needs torch >= 2.6 and transformers; nothing else of mmopd's.
set -u
cd "$(dirname "$0")/../.."
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then echo "needs at least 2 GPUs, found $gpus"; exit 2; fi
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=1
run() { timeout 1800 torchrun --standalone --nproc_per_node "$gpus" benchmarks/gpu/fsdp_oom.py --layout "$1" "${@:2}" 2>&1 | grep -E "^$1 rank|Error" ; }
ddp=$(run ddp "$@"); echo "$ddp"
fsdp=$(run fsdp "$@"); echo "$fsdp"
echo "$ddp" | grep -q "CUDA out of memory" || { echo "FAIL: DDP did not run out of memory"; exit 1; }
echo "$fsdp" | grep -q " loss " || { echo "FAIL: FSDP did not train"; exit 1; }
echo "OK: DDP runs out of memory on $gpus GPUs of 80 GB; FSDP trains"
