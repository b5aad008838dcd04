"""A student that data-parallel training cannot fit in 80 GB per GPU, and that trains sharded (FSDP2).

    torchrun --nproc_per_node N benchmarks/gpu/fsdp_oom.py --layout ddp    # CUDA out of memory
    torchrun --nproc_per_node N benchmarks/gpu/fsdp_oom.py --layout fsdp   # trains: loss and memory per rank

(`benchmarks/gpu/fsdp_oom.sh` runs both and checks the outcomes; `--cpu-offload` tries train.fsdp_cpu_offload.)
N >= 2 GPUs, each capped at --budget-gb (80 GB) with torch.cuda.set_per_process_memory_fraction, so a larger GPU
behaves like an 80 GB one.

The student is Qwen2.5-7B-shaped (7.6e9 parameters, random weights), trained as `mmopd train` trains it: fp32
weights, bf16 compute, AdamW. Weights, gradients and AdamW's two moments take 16 bytes a parameter, 122 GB; DDP
holds all of it on every GPU (and a gradient bucket copy), FSDP holds 122/N GB. The sharding is mmopd's own
`mmopd.models.sharding.shard`, loaded from its file, so the script needs only torch and transformers (no datasets, vLLM).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import Qwen2Config, Qwen2ForCausalLM

SHARDING = Path(__file__).resolve().parents[2] / "mmopd" / "sharding.py"
QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)


def load_sharding():
    spec = importlib.util.spec_from_file_location("mmopd_sharding", SHARDING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--budget-gb", type=float, default=80.0)
    parser.add_argument("--cpu-offload", action="store_true", help="fsdp: shards, gradients and AdamW state in CPU "
                        "memory (train.fsdp_cpu_offload)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gb * 1e9 / total), device)
    torch.manual_seed(0)
    with torch.device(device):
        student = Qwen2ForCausalLM(Qwen2Config(**QWEN25_7B)).train()
    if args.layout == "fsdp":
        trained = load_sharding().shard(student, device, trainable=True, cpu_offload=args.cpu_offload)
    else:
        trained = DistributedDataParallel(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    ids = torch.randint(0, QWEN25_7B["vocab_size"], (args.batch, args.seq), device=device,
                        generator=torch.Generator(device).manual_seed(rank))
    try:
        for step in range(args.steps):
            with torch.autocast("cuda", torch.bfloat16):  # FSDP gathers bf16 weights itself; DDP autocasts
                loss = trained(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            peak = torch.cuda.max_memory_allocated(device) / 1e9
            print(f"{args.layout} rank {rank}/{world} step {step + 1} loss {loss.item():.4f} peak {peak:.1f} GB "
                  f"of a {args.budget_gb:.0f} GB budget", flush=True)
    except torch.OutOfMemoryError:
        peak = torch.cuda.max_memory_allocated(device) / 1e9
        print(f"{args.layout} rank {rank}/{world} CUDA out of memory at {peak:.1f} GB of a {args.budget_gb:.0f} GB "
              "budget", flush=True)
        return 3
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
