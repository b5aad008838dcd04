"""Per-token divergence from last hidden states through both LM heads, forward + backward.

    python -m benchmarks.loss [--n 256,1k,4k] [--v 8k] [--h 256] [--kinds reverse_kl,jsd] [--dtype float32]

The defaults take about 5 minutes on one CPU core. The GPU target sizes:
--n 8k,32k --v 151936 --h 3584 --dtype bfloat16.

Every case: student hidden [N, H] and head [V, H] (trainable), teacher hidden [N, H] and head [V, H]
(frozen), the mean divergence over tokens, and its backward to the student's hidden and head.
Methods, each run in a fresh process (see benchmarks/measure.py for how time and memory are measured):

- floor:      the LM-head matmuls alone (student forward, its two backward matmuls, teacher forward):
              the least any exact method does
- trl:        the formula as TRL writes it (generalized_jsd_loss): log_softmax of both [N, V] logits
- ours_logits: mmopd.losses.token_divergence on materialised logits (the simple API)
- ours_fused:  mmopd.losses.fused_token_divergence from hidden states: per-token values, logits recomputed
              in backward
- ours_loss:   mmopd.losses.fused_divergence_loss: the weighted sum with gradients computed alongside the
              values, no recompute (what the trainer uses)
- liger:      LigerFusedLinearJSD, where liger_kernel imports (jsd-type kinds only)
- logits_only: (not in the default --methods) token_divergence alone on [N, V] logits made before the call, so
              its extra peak is the logits path's own: the gradient and one chunk's buffers, e.g.
              python -m benchmarks.loss --methods logits_only --kinds reverse_kl --n 4k --v 32000 --reps 1

Ratios are against the floor and against trl, measured in the same run.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.measure import GIB, MIB, device_of, machine, peak_bytes, run_child, seconds, sizes, table
from mmopd.losses import fused_divergence_loss, fused_token_divergence, token_divergence

METHODS = ("floor", "trl", "ours_logits", "ours_fused", "ours_loss", "liger")
BETA = {"reverse_kl": 1.0, "forward_kl": 0.0, "jsd": 0.5}  # TRL's generalized_jsd_loss: β=1 is KL(S‖T)


def trl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token divergence as TRL's generalized_jsd_loss writes it (tvd: the same style). [N, V] -> [N]"""
    s = F.log_softmax(student_logits, dim=-1)
    t = F.log_softmax(teacher_logits, dim=-1)
    if kind == "tvd":
        return 0.5 * (s.exp() - t.exp()).abs().sum(-1)
    beta = BETA[kind]
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype, device=s.device)
        mixture = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mixture, t, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(mixture, s, reduction="none", log_target=True)
    return jsd.sum(-1)


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as err:  # not installed, or no Triton on this machine
        return None, f"{type(err).__name__}: {err}"
    return LigerFusedLinearJSD, None


def make_case(method: str, kind: str, n: int, v: int, h: int, dtype: torch.dtype, device: torch.device,
              chunk: int | None = None):
    """Inputs and a closure that runs forward + backward once (gradients reset each call)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    s_hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    s_weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    t_hidden = torch.randn(n, h, generator=g).to(device, dtype)
    t_weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype)
    grad_logits = torch.randn(n, v, generator=g).to(device, dtype) / (n * v) if method == "floor" else None

    def reset():
        s_hidden.grad, s_weight.grad = None, None

    if method == "floor":
        def run():
            reset()
            with torch.no_grad():
                t_hidden @ t_weight.T
            (s_hidden @ s_weight.T).backward(grad_logits)
    elif method == "trl":
        def run():
            reset()
            with torch.no_grad():
                t_logits = t_hidden @ t_weight.T
            trl_divergence(s_hidden @ s_weight.T, t_logits, kind).mean().backward()
    elif method == "ours_logits":
        def run():
            reset()
            with torch.no_grad():
                t_logits = t_hidden @ t_weight.T
            token_divergence(s_hidden @ s_weight.T, t_logits, kind, beta=0.5, chunk_size=chunk).mean().backward()
    elif method == "logits_only":
        s_logits = (s_hidden @ s_weight.T).detach().requires_grad_()  # [N, V], made before the call
        with torch.no_grad():
            t_logits = t_hidden @ t_weight.T  # [N, V]

        def run():
            s_logits.grad = None
            token_divergence(s_logits, t_logits, kind, beta=0.5, chunk_size=chunk).mean().backward()
    elif method == "ours_fused":
        def run():
            reset()
            fused_token_divergence(s_hidden, s_weight, t_hidden, t_weight, kind, beta=0.5,
                                   chunk_size=chunk).mean().backward()
    elif method == "ours_loss":
        weights = torch.full((n,), 1.0 / n, device=device)

        def run():
            reset()
            fused_divergence_loss(s_hidden, s_weight, t_hidden, t_weight, weights, kind, beta=0.5,
                                  chunk_size=chunk)[0].backward()
    else:
        cls, why = _liger()
        if cls is None:
            raise RuntimeError(f"liger not available: {why}")
        if kind not in BETA:
            raise RuntimeError(f"liger has no {kind}")
        loss_fn = cls(jsd_beta=BETA[kind])

        def run():
            reset()
            loss_fn(s_hidden, s_weight, t_hidden, t_weight, None).backward()
    return run


def child(args: argparse.Namespace) -> None:
    """One case in this process: print {"seconds", "peak_bytes"} as JSON."""
    torch.set_num_threads(args.threads)
    device = device_of(args.device)
    run = make_case(args.method, args.kind, args.n[0], args.v[0], args.h, getattr(torch, args.dtype), device,
                    args.chunk or None)
    peak = peak_bytes(run, device)
    print(json.dumps({"seconds": seconds(run, device, args.reps), "peak_bytes": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="256,1k,4k", help="tokens N (comma-separated; 1k = 1024)")
    parser.add_argument("--v", default="8k", help="vocabulary sizes V")
    parser.add_argument("--h", type=int, default=256, help="hidden size H")
    parser.add_argument("--kinds", default="reverse_kl,jsd", help="divergences: reverse_kl,forward_kl,jsd,tvd")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"{','.join(METHODS)} or logits_only")
    parser.add_argument("--dtype", default="float32", help="dtype of hidden states and heads")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--chunk", type=int, default=0,
                        help="rows per chunk for our methods (0: the library default, 2**25 // V rows)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.n, args.v = sizes(args.n), sizes(args.v)
    if args.child:
        args.method, args.kind = args.child.split(":")
        child(args)
        return

    torch.set_num_threads(args.threads)
    device = device_of(args.device)
    methods = args.methods.split(",")
    chunk = f"{args.chunk} rows" if args.chunk else "default (2**25 // V rows)"
    print(f"# loss benchmark on {machine(device)}; {args.dtype}, H={args.h}, chunk {chunk}, median of {args.reps}")
    if "liger" in methods:
        cls, why = _liger()
        if cls is None:
            print(f"# liger skipped: {why}")
            methods.remove("liger")
    rows, records = [], []
    for kind in args.kinds.split(","):
        for v in args.v:
            for n in args.n:
                got = {}
                for method in methods:
                    child_args = ["--child", f"{method}:{kind}", "--n", str(n), "--v", str(v), "--h", str(args.h),
                                  "--dtype", args.dtype, "--device", args.device, "--reps", str(args.reps),
                                  "--threads", str(args.threads), "--chunk", str(args.chunk)]
                    got[method] = run_child("benchmarks.loss", child_args)
                    records.append({"kind": kind, "n": n, "v": v, "h": args.h, "method": method, **got[method]})
                for method in methods:
                    r = got[method]
                    if "error" in r:
                        rows.append([kind, n, v, method, "error: " + r["error"][:60], "", "", ""])
                        continue
                    ratio = {base: (f"{r['seconds'] / got[base]['seconds']:.2f}x"
                                    if "seconds" in got.get(base, {}) else "-") for base in ("floor", "trl")}
                    rows.append([kind, n, v, method, f"{r['seconds'] * 1e3:.1f}", ratio["floor"], ratio["trl"],
                                 f"{r['peak_bytes'] / MIB:.0f}"])
    print(table(["kind", "N", "V", "method", "ms", "vs floor", "vs trl", "extra peak MiB"], rows))
    print(f"# extra peak = {'CUDA max_memory_allocated' if device.type == 'cuda' else 'peak RSS'} over the inputs "
          f"(1 GiB = {GIB // MIB} MiB); see benchmarks/measure.py")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(device), "dtype": args.dtype, "rows": records}, f, indent=1)


if __name__ == "__main__":
    main()
