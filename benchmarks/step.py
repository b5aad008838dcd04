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
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.measure import GIB, MIB, device_of, machine, peak_bytes, run_child, table
from benchmarks.models import RandomPrompts, random_qwen2, random_records, shape_of
from mmopd.batch import TokenSpace
from mmopd.config import load_config
from mmopd.objectives import Models, Timer, objective_step

VARIANTS = {
    "logits": {"objective.fused": "never"},
    "fused": {"objective.fused": "always"},
    "sampled_fused": {"objective.fused": "always", "objective.estimator": "sampled"},
    # rollouts by a colocated vllm.LLM, weights synced after each optimizer step (run in .venv-vllm)
    "vllm_fused": {"objective.fused": "always", "rollout.engine": "vllm"},
}


def measure_variant(args: argparse.Namespace, overrides: dict) -> dict:
    """Build both models and time `args.steps` steps of one variant in this process."""
    torch.set_num_threads(args.threads)
    device = device_of(args.device)
    cuda = device.type == "cuda"
    t_dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if cuda else torch.float32)
    s_dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.float32
    vocab = shape_of(args.student)[5]
    student = random_qwen2(args.student, s_dtype, device, seed=0).train()
    teacher = random_qwen2(args.teacher, t_dtype, device, seed=1).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    records = random_records(args.prompts, args.prompt_len, vocab)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cuda and args.dtype == "auto")
    config = load_config(None, {"student.path": "random", "teacher.path": "random", "data.train": "random",
                                "rollout.max_new_tokens": args.new, **overrides})
    models = Models(RandomPrompts(), student, student, None, teacher, None, TokenSpace(vocab), [-1], 0,
                    device).with_engines(config)

    def step(timer: Timer) -> dict:
        with autocast:
            row = objective_step(models, records, config, torch.Generator(device).manual_seed(0), timer,
                                 lambda loss: loss.backward())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with timer.phase("sync"):
            models.rollout.sync(student)
        return row

    step(Timer())  # warm-up
    peak = peak_bytes(lambda: step(Timer()), device)
    times, splits, tokens = [], [], 0.0
    for _ in range(args.steps):
        timer = Timer()
        start = time.perf_counter()
        tokens = step(timer)["response_tokens"]
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        splits.append(timer.seconds)
    return {"seconds": statistics.median(times), "split": {k: statistics.median(s[k] for s in splits)
                                                           for k in splits[0]},
            "peak_bytes": peak, "tokens": tokens, "dtypes": [str(s_dtype), str(t_dtype)]}


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
    parser.add_argument("--json", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if shape_of(args.student)[5] != shape_of(args.teacher)[5]:
        raise SystemExit("student and teacher need the same vocabulary size")
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
              ("student", "teacher", "prompts", "prompt_len", "new", "steps", "dtype", "device", "threads")]
    results = {name: run_child("benchmarks.step", [*passed, "--child", name]) for name in args.variants.split(",")}
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(device), "args": vars(args), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
