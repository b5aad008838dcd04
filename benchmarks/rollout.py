"""Rollout throughput: the rollout engines (hf: mmopd's decode loop; vllm: a colocated vllm.LLM) against Hugging
Face `model.generate` on the same model and prompts.

    python -m benchmarks.rollout [--model 256,4,4,2,1024,8192] [--batch 1,4,16,64] [--prompt-len 32] [--new 32]
                                 [--engines hf,vllm]

`--engines vllm` needs vLLM in the interpreter: run it with .venv-vllm/bin/python (`make vllm-env`).
Random-weight Qwen2.5-shaped model (--model 0.5b for the real shape), left-padded prompts of different
lengths, sampling at temperature 1, every row generating exactly --new tokens (no EOS stop). Tokens/s is
batch × new tokens / median wall-clock seconds; the ratio is ours / generate, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.measure import device_of, machine, seconds, sizes, table
from benchmarks.models import RandomPrompts, random_qwen2, random_records, shape_of
from mmopd.engines.hf import rollout
from mmopd.engines.vllm import Colocated, VLLMRollout, write_engine_checkpoint
from mmopd.models.adapter import PolicySide
from mmopd.step.batch import Sampling, TokenSpace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="256,4,4,2,1024,8192",
                        help="a Qwen2.5 size (0.5b, 1.5b, 7b) or H,layers,heads,kv_heads,intermediate,vocab")
    parser.add_argument("--batch", default="1,4,16,64")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=32, help="new tokens per row")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engines", default="hf", help="hf and/or vllm, each timed against generate")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    engines = args.engines.split(",")
    shown = ["ours" if e == "hf" else e for e in engines]  # "ours": the hf engine, mmopd's own decode loop
    torch.set_num_threads(args.threads)
    device = device_of(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = random_qwen2(args.model, dtype, device).eval()
    vocab = shape_of(args.model)[5]
    adapter, space = RandomPrompts(), TokenSpace(vocab)
    vllm = None
    if "vllm" in engines:  # the same weights, written as vLLM loads them
        start = write_engine_checkpoint(model, Path(tempfile.mkdtemp(prefix="bench-rollout-")) / "start", str)
        transport = Colocated(str(start), str(dtype).removeprefix("torch."), None, 0.3, False, 0)
        vllm = VLLMRollout(transport, space, [], 0, args.new, start.parent, False, str)  # no EOS: every row runs --new
    print(f"# rollout benchmark on {machine(device)}; model {args.model}, {dtype}, prompts <= {args.prompt_len} "
          f"tokens, {args.new} new tokens, median of {args.reps}")
    rows, records = [], []
    for batch in sizes(args.batch):
        prompts = adapter.encode_prompts(random_records(batch, args.prompt_len, vocab), None).to(device)

        def ours():
            return rollout(PolicySide(adapter, model, None, space, eos_ids=[-1], pad_id=0), prompts,
                           max_new_tokens=args.new, sampling=Sampling(),
                           generator=torch.Generator(device).manual_seed(0))

        @torch.no_grad()
        def generate():
            return model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                                  do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new,
                                  min_new_tokens=args.new, eos_token_id=None, pad_token_id=0)

        def engine():
            return vllm.sample(prompts, Sampling(), torch.Generator(device).manual_seed(0))

        runs = {"generate": generate, **({"ours": ours} if "hf" in engines else {}), **({"vllm": engine} if vllm else {})}
        for name in ("ours", "vllm"):
            if name in runs:
                assert runs[name]().tokens.shape == (batch, args.new), name
        times = {name: seconds(run, device, args.reps) for name, run in runs.items()}
        tps = {k: batch * args.new / t for k, t in times.items()}
        rows.append([batch, f"{tps['generate']:.0f}", *(f"{tps[e]:.0f}" for e in shown),
                     *(f"{tps[e] / tps['generate']:.2f}x" for e in shown)])
        records.append({"batch": batch, "tokens_per_s": tps, "seconds": times})
    print(table(["batch", "generate tok/s", *(f"{e} tok/s" for e in shown), *(f"{e} / generate" for e in shown)],
                rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(device), "model": args.model, "rows": records}, f, indent=1)


if __name__ == "__main__":
    main()
