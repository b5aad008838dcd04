"""One on-policy distillation step end to end: rollout, teacher scoring, student loss + backward, optimizer.

    python -m benchmarks.step [--student 256,4,4,2,1024,8192] [--teacher 512,4,8,2,2048,8192]
                              [--prompts 8] [--prompt-len 32] [--new 32] [--steps 3]

The issue's GPU sizes: --student 0.5b --teacher 1.5b --prompts 8 --prompt-len 128 --new 256 (bf16 on CUDA).
Random-weight Qwen2.5-shaped models; responses never stop early (no EOS), so every step generates
prompts × new tokens. Rows: mmopd's step with objective.fused=never (logits) and =always (hidden states
and LM heads), both reverse KL with the full estimator, and the sampled estimator; TRL's
DistillationTrainer only where `trl` imports. `vllm_fused` samples with a colocated vllm.LLM (run the benchmark
with .venv-vllm/bin/python), and its sync column is the weight reload after each optimizer step. Each variant runs in a fresh process; time is the median
over --steps after one warm-up step; peak memory is measured over one step (see benchmarks/measure.py).

--sharded N adds the sharded column: the fused variant on N processes (torchrun; gloo on CPU, NCCL on GPUs),
once with the student data-parallel (DDP, teacher replicated) and once with both sharded (FSDP2, as
train.sharding=fsdp and teacher.sharding=fsdp do), each rank on its own prompts. Per rank: what it holds after
the models are built (and sharded), and its peak over the steps, both over its memory before the models. On CUDA
that is allocated memory; on CPU the resident set (the children run with a fixed malloc mmap threshold, so
freed tensors leave the resident set). The table prints the largest rank's numbers and the ratios to DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from benchmarks.measure import GIB, MIB, device_of, machine, peak_bytes, rank_memory, reset_peak, run_child, table
from benchmarks.models import RandomPrompts, random_qwen2, random_records, shape_of
from mmopd.config import load_config
from mmopd.models.adapter import PolicySide
from mmopd.models.sharding import reshard, shard
from mmopd.run.objectives import Models, Plan, Timer, objective_step
from mmopd.step.batch import TokenSpace

VARIANTS = {
    "logits": {"objective.fused": "never"},
    "fused": {"objective.fused": "always"},
    "sampled_fused": {"objective.fused": "always", "objective.estimator": "sampled"},
    # rollouts by a colocated vllm.LLM, weights synced after each optimizer step (run in .venv-vllm)
    "vllm_fused": {"objective.fused": "always", "rollout.engine": "vllm"},
}
LAYOUTS = ("ddp", "fsdp")  # the sharded column's runs, of the fused variant


def _dtypes(args: argparse.Namespace, cuda: bool) -> tuple[torch.dtype, torch.dtype]:
    """(student, teacher) dtypes."""
    if args.dtype != "auto":
        return getattr(torch, args.dtype), getattr(torch, args.dtype)
    return torch.float32, torch.bfloat16 if cuda else torch.float32


def _stepper(args: argparse.Namespace, overrides: dict, trained: torch.nn.Module, student: torch.nn.Module,
             teacher: torch.nn.Module, device: torch.device, seed: int) -> Callable[[Timer], dict]:
    """One step of a variant: `trained` is the student as it runs the loss (DDP-wrapped or not), `student` the
    module that samples; the teacher is resharded after the step (a no-op unless it is sharded)."""
    vocab = shape_of(args.student)[5]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    records = random_records(args.prompts, args.prompt_len, vocab, seed=seed)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and args.dtype == "auto")
    config = load_config(None, {"student.path": "random", "teacher.path": "random", "data.train": "random",
                                "rollout.max_new_tokens": args.new, **overrides})
    adapter, space = RandomPrompts(), TokenSpace(vocab)
    models = Models(trained, PolicySide(adapter, student, None, space, [-1], 0),
                    PolicySide(adapter, teacher, None, space, [-1], 0), device).with_engines(config)

    def step(timer: Timer) -> dict:
        with autocast:
            row = objective_step(models, records, Plan.of(config), torch.Generator(device).manual_seed(seed), timer,
                                 lambda loss: loss.backward())
        reshard(teacher)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with timer.phase("sync"):
            models.rollout.sync(student)
        return row

    return step


def _timed(step: Callable[[Timer], dict], steps: int, device: torch.device) -> dict:
    """Median seconds and phase split over `steps` steps, and the generated tokens of the last."""
    times, splits, tokens = [], [], 0.0
    for _ in range(steps):
        timer = Timer()
        start = time.perf_counter()
        tokens = step(timer)["response_tokens"]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        splits.append(timer.seconds)
    return {"seconds": statistics.median(times), "split": {k: statistics.median(s[k] for s in splits)
                                                           for k in splits[0]}, "tokens": tokens}


def measure_variant(args: argparse.Namespace, overrides: dict) -> dict:
    """Build both models and time `args.steps` steps of one variant in this process."""
    torch.set_num_threads(args.threads)
    device = device_of(args.device)
    s_dtype, t_dtype = _dtypes(args, device.type == "cuda")
    student = random_qwen2(args.student, s_dtype, device, seed=0).train()
    teacher = random_qwen2(args.teacher, t_dtype, device, seed=1).eval().requires_grad_(False)
    step = _stepper(args, overrides, student, student, teacher, device, seed=0)
    step(Timer())  # warm-up
    peak = peak_bytes(lambda: step(Timer()), device)
    return {**_timed(step, args.steps, device), "peak_bytes": peak, "dtypes": [str(s_dtype), str(t_dtype)]}


def measure_layout(args: argparse.Namespace, layout: str) -> dict | None:
    """One rank of a torchrun'd `layout` (ddp or fsdp) run of the fused variant; rank 0 returns every rank's
    memory and its own time."""
    cuda = torch.cuda.is_available() and args.device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        if args.gpu_budget_gib:  # what one smaller GPU would hold
            torch.cuda.set_per_process_memory_fraction(args.gpu_budget_gib * GIB /
                                                       torch.cuda.get_device_properties(device).total_memory)
    torch.set_num_threads(args.threads)
    s_dtype, t_dtype = _dtypes(args, cuda)
    before = rank_memory(device)
    student = random_qwen2(args.student, s_dtype, device, seed=0).train()
    teacher = random_qwen2(args.teacher, t_dtype, device, seed=1).eval().requires_grad_(False)
    if layout == "fsdp":
        trained = shard(student, device, trainable=True)
        shard(teacher, device, trainable=False)
    else:
        trained = DistributedDataParallel(student)
    held = rank_memory(device) - before
    reset_peak(device)
    step = _stepper(args, VARIANTS["fused"], trained, student, teacher, device, seed=rank)
    step(Timer())  # warm-up: the optimizer's state is allocated here
    timed = _timed(step, args.steps, device)
    memory = [None] * dist.get_world_size()
    dist.all_gather_object(memory, {"held": held, "peak": rank_memory(device, peak=True) - before})
    dist.destroy_process_group()
    return {**timed, "ranks": memory} if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="256,4,4,2,1024,8192", help="a Qwen2.5 size or H,layers,heads,kv,inter,V")
    parser.add_argument("--teacher", default="512,4,8,2,2048,8192")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default="logits,fused,sampled_fused", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--dtype", default="auto", help="auto: student fp32 + bf16 autocast, teacher bf16 on CUDA; "
                                                         "fp32 on CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sharded", type=int, default=0, help="processes of the DDP-vs-FSDP column (0: none)")
    parser.add_argument("--gpu-budget-gib", type=float, default=0, help="cap each GPU rank's memory to this "
                        "(torch.cuda.set_per_process_memory_fraction), as if the GPU were that small")
    parser.add_argument("--json", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if shape_of(args.student)[5] != shape_of(args.teacher)[5]:
        raise SystemExit("student and teacher need the same vocabulary size")
    if args.child in LAYOUTS:
        result = measure_layout(args, args.child)
        if result is not None:
            print(json.dumps(result))
        return
    if args.child:
        print(json.dumps(measure_variant(args, VARIANTS[args.child])))
        return
    device = device_of(args.device)
    torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    print(f"# step benchmark on {machine(device)}; student {args.student}, teacher {args.teacher}, dtype "
          f"{args.dtype}, {args.prompts} prompts <= {args.prompt_len} tokens, {args.new} new tokens, "
          f"median of {args.steps} steps")
    passed = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in
              ("student", "teacher", "prompts", "prompt_len", "new", "steps", "dtype", "device", "threads",
               "gpu_budget_gib")]
    results = {name: run_child("benchmarks.step", [*passed, "--child", name]) for name in args.variants.split(",")
               if name}
    base = results.get("logits", {}).get("seconds")
    unit, scale = ("GiB", GIB) if cuda else ("MiB", MIB)
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "error: " + r["error"][:80], "", "", "", "", "", "", ""])
            continue
        rows.append([name, f"{r['seconds']:.2f}",
                     *(f"{r['split'][k]:.2f}" for k in ("rollout", "sync", "teacher", "student")),
                     f"{r['peak_bytes'] / scale:.2f}", f"{r['tokens'] / r['seconds']:.0f}",
                     f"{base / r['seconds']:.2f}x" if base else "-"])
    print(table(["variant", "s/step", "rollout s", "sync s", "teacher s", "student s", f"extra peak {unit}",
                 "generated tok/s", "speed vs logits"], rows))
    try:
        import trl  # noqa: F401
        print("# trl imports, but no TRL comparison is wired up in this benchmark yet")
    except ImportError:
        print("# TRL DistillationTrainer: not measured (trl is not installed)")
    sharded = sharded_column(args, passed, cuda) if args.sharded else {}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(device), "args": vars(args), "rows": results, "sharded": sharded}, f,
                      indent=1)


def sharded_column(args: argparse.Namespace, passed: list[str], cuda: bool) -> dict:
    """Run the fused variant on `args.sharded` processes as DDP and as FSDP; print memory and time against DDP."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**16)  # freed tensors leave the resident set (see __doc__)
    launch = ["--standalone", f"--nproc_per_node={args.sharded}", "-m", "benchmarks.step", *passed]
    results = {layout: _launched(launch, layout) for layout in LAYOUTS}
    kind, unit, scale = ("allocated", "GiB", GIB) if cuda else ("resident", "MiB", MIB)
    base = results["ddp"]
    rows = []
    for layout, r in results.items():
        if "error" in r:
            rows.append([layout, "error: " + r["error"][:100], "", "", "", "", ""])
            continue
        held, peak = (max(rank[k] for rank in r["ranks"]) for k in ("held", "peak"))
        ratios = ["-", "-", "-"] if "error" in base else [
            f"{held / max(rank['held'] for rank in base['ranks']):.2f}x",
            f"{peak / max(rank['peak'] for rank in base['ranks']):.2f}x", f"{r['seconds'] / base['seconds']:.2f}x"]
        rows.append([layout, f"{r['seconds']:.2f}", f"{held / scale:.1f}", f"{peak / scale:.1f}", *ratios])
    print(f"# sharded column: the fused variant on {args.sharded} processes, per rank (the largest rank), "
          f"{kind} memory over the rank's memory before the models")
    print(table(["layout", "s/step", f"held {unit}", f"peak {unit}", "held vs ddp", "peak vs ddp",
                 "time vs ddp"], rows))
    return results


def _launched(launch: list[str], layout: str) -> dict:
    """One layout's torchrun'd run; a run that fails is run once more (a rendezvous among ranks on a loaded machine
    can fail once: seen in CI), and the first failure is kept in the result and said on stderr, not hidden."""
    result = run_child("torch.distributed.run", [*launch, "--child", layout])
    if "error" not in result:
        return result
    print(f"# {layout}: the first run failed ({result['error']}); running it once more", file=sys.stderr)
    return {**run_child("torch.distributed.run", [*launch, "--child", layout]), "first_failure": result["error"]}


if __name__ == "__main__":
    main()
