"""The bias of top-k teacher distributions (teacher.top_k), measured on real models' logits.

    python -m benchmarks.topk --student DIR --teacher DIR --data FILE.jsonl [--k 1,2,4,8] [--kinds reverse_kl,jsd]

Build the models with `mmopd toy text OUT` (a trained teacher and a weaker student): then --student
OUT/student --teacher OUT/teacher --data OUT/data/eval.jsonl. The student samples responses to the prompts;
both models score them; per response token we compare the exact divergence over the whole action space
with the top-k one (mmopd.losses.topk_token_divergence). Columns: the mean exact and top-k values, the
mean relative error |top-k − exact| / exact, and the cosine between the top-k and the exact gradient with
respect to the student's logits (1 = the same training direction).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.measure import machine, sizes, table
from mmopd.config import load_config
from mmopd.losses import masked_mean, token_divergence, topk_token_divergence
from mmopd.run.objectives import sampling_of
from mmopd.run.session import Session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True, help="a text JSONL of prompts")
    parser.add_argument("--k", default="1,2,4,8")
    parser.add_argument("--kinds", default="reverse_kl,forward_kl,jsd")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(None, {"modality": "text", "student.path": args.student, "teacher.path": args.teacher,
                                "data.train": args.data, "rollout.max_new_tokens": args.new,
                                "train.progress": False})
    session = Session(config)
    m = session.models()
    records = session.train_data.records[: args.prompts]
    s_prompts = m.adapter.encode_prompts(records, m.policy.processor)
    t_prompts = m.adapter.encode_prompts(records, m.teacher.processor)
    responses = m.rollout.sample(s_prompts, sampling_of(config), torch.Generator().manual_seed(0))
    with torch.no_grad():
        calls, space = m.adapter.calls, m.policy.space
        s_logits = space.restrict(calls.response_logits(m.policy.model, s_prompts, responses.tokens)).float()
        t_logits = space.restrict(calls.response_logits(m.teacher.model, t_prompts, responses.tokens)).float()
    keep = responses.mask.bool()  # [B, T]
    s_logits, t_logits = s_logits[keep], t_logits[keep]  # [N, A]
    print(f"# top-k bias on {machine(torch.device('cpu'))}; {s_logits.shape[0]} response tokens sampled by "
          f"{args.student}, teacher {args.teacher}, action space A={s_logits.shape[-1]}")
    rows, results = [], []
    for kind in args.kinds.split(","):
        student = s_logits.clone().requires_grad_()
        exact = token_divergence(student, t_logits, kind)
        (exact_grad,) = torch.autograd.grad(exact.sum(), student)
        for k in sizes(args.k):
            if k >= s_logits.shape[-1]:
                continue
            top = t_logits.topk(k, dim=-1)
            approx = topk_token_divergence(student, top.values, top.indices, kind)
            (approx_grad,) = torch.autograd.grad(approx.sum(), student)
            ones = torch.ones_like(exact)
            rel = (masked_mean((approx - exact).abs(), ones) / masked_mean(exact, ones).clamp(min=1e-12)).item()
            cosine = torch.nn.functional.cosine_similarity(approx_grad.flatten(), exact_grad.flatten(), dim=0).item()
            mass = t_logits.softmax(-1).gather(-1, top.indices).sum(-1).mean().item()
            results.append({"kind": kind, "k": k, "exact": exact.mean().item(), "topk": approx.mean().item(),
                            "relative_error": rel, "grad_cosine": cosine, "teacher_mass_in_topk": mass})
            rows.append([kind, k, f"{mass:.3f}", f"{exact.mean().item():.4f}", f"{approx.mean().item():.4f}",
                         f"{rel:.3f}", f"{cosine:.3f}"])
    print(table(["kind", "K", "teacher mass in top-K", "exact", "top-K", "rel. error", "grad cosine"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(torch.device("cpu")), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
