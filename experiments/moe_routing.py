"""MoE routing under distillation: does on-policy distillation keep an MoE student's routing that SFT moves?

    python -m experiments moe_routing [--out DIR] [--size tiny|full] [--publish]

Two MoE models of the text toy's family `qwen3_moe` (Qwen3MoeForCausalLM, 4 experts, 2 routed a token) are
built once per out dir with the toy's SFT recipe: a student of the toy student's size (150 steps, as the toy
student) and a teacher of the toy teacher's width (200 steps, half the toy teacher's, to keep it short).
Then, at the toy's batch, lr and schedule, equal steps:
- the MoE student from the dense text teacher, by OPD (full reverse KL) and by SFT on the dataset answers
  (then SFT again for as many steps as spend OPD's FLOPs, rounded up to EVERY);
  every EVERY steps its routing on held-out sequences (eval prompts with their dataset answers,
  teacher-forced, so every checkpoint routes the same tokens) is compared with the start's;
- the dense toy student by OPD from the MoE teacher and, as the reference, from the dense teacher.
The routing is also measured on the start student's own samples for the same prompts (temperature 1, one each,
teacher-forced likewise): the tokens OPD trains on, where SFT's answers are the dataset's.
Routing measures: each expert's load (its fraction of the routed token slots, per layer), the fraction of
(token, layer) pairs whose set of top-k experts changed, and the mean total variation between the router's
distributions over experts before and after.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import mmopd  # noqa: E402
from experiments.self_distill import sample  # noqa: E402
from experiments.text_task import (SIZES, base_overrides, build_task, curve, mean_std, run_config,  # noqa: E402
                                   save_results)
from mmopd.config import load_config  # noqa: E402
from modalities.text import toy  # noqa: E402

NAME = "moe_routing"
STEPS = {"full": 200, "tiny": 4}
EVERY = {"full": 50, "tiny": 2}
ROUTING_RECORDS = {"full": 200, "tiny": 4}
# (toy size, SFT steps at full size, lr, seed): the toy's recipe for its student and, shorter, its teacher
BUILDS = {"student": ("student_moe", toy.STUDENT_STEPS, toy.STUDENT_LR, 1),
          "teacher": ("teacher_moe", toy.TEACHER_STEPS // 2, toy.TEACHER_LR, 0)}
TINY_BUILD = {"steps": 2, "batch_size": 8}
MOE_METHODS: dict[str, dict[str, Any]] = {
    "on_policy": {"objective.kind": "on_policy", "objective.estimator": "full"},
    "sft": {"objective.kind": "sft"},
}
LABELS = {"on_policy": "OPD (full reverse KL) from the dense teacher", "sft": "SFT on the dataset answers",
          "sft_flops": "SFT on the dataset answers, OPD's FLOPs",
          "moe_teacher": "OPD from the MoE teacher", "dense_teacher": "OPD from the dense teacher"}


def read_records(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` records of a JSONL file (all of them without a limit)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()[:limit]]


def active_params(model: Any) -> int:
    """Parameters one token uses: all of them, less the experts it is not routed to."""
    config = model.config
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    unused = experts * (config.num_experts - config.num_experts_per_tok) // config.num_experts
    return sum(p.numel() for p in model.parameters()) - unused


def build_moe(out_dir: Path, role: str, task: dict[str, Any], size: str) -> dict[str, Any]:
    """The MoE student or teacher, SFT-trained on the toy's data and saved in out_dir/role; built once."""
    info_path = out_dir / role / "build.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    p = task["paths"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(p["student"])
    train, evals = read_records(p["train"]), read_records(p["eval"], SIZES[size]["eval_limit"])
    dims, steps, lr, seed = BUILDS[role]
    steps, batch_size = (steps, toy.BATCH_SIZE) if size == "full" else (TINY_BUILD["steps"], TINY_BUILD["batch_size"])
    torch.manual_seed(seed)
    model = toy.build_model(tokenizer, dims)
    start = time.time()
    toy.fit(model, tokenizer, train, steps, lr, batch_size, seed)
    seconds = time.time() - start
    model.save_pretrained(out_dir / role)
    tokenizer.save_pretrained(out_dir / role)
    info = {"path": str(out_dir / role), "sft_steps": steps, "seconds": seconds, "active_params": active_params(model),
            "params": sum(q.numel() for q in model.parameters()),
            "accuracy": toy.greedy_accuracy(model, tokenizer, evals, SIZES[size]["max_new_tokens"]),
            "load": expert_load(router_probs(model, tokenizer, read_records(p["eval"], ROUTING_RECORDS[size])),
                                model.config.num_experts_per_tok)}
    info_path.write_text(json.dumps(info, indent=1))
    return info


@torch.no_grad()
def router_probs(model: Any, tokenizer: Any, records: list[dict[str, Any]]) -> torch.Tensor:
    """The router's distribution over experts at every token of each record's prompt + answer + EOS
    (teacher-forced): [layers, tokens, experts]."""
    ids, mask, _ = toy.encode_sft(tokenizer, records)  # [N, T]
    out = model.eval()(input_ids=ids, attention_mask=mask, output_router_logits=True)
    keep = mask.flatten().bool()  # router_logits are [N·T, experts] per layer
    return torch.stack([torch.softmax(logits.float()[keep], -1) for logits in out.router_logits])


def top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    """The sorted indices of each token's k most likely experts: [layers, tokens, k]."""
    return probs.topk(k, -1).indices.sort(-1).values


def expert_load(probs: torch.Tensor, k: int) -> list[list[float]]:
    """Each expert's fraction of the routed token slots, per layer: [layers][experts]."""
    chosen = torch.nn.functional.one_hot(top_k(probs, k), probs.shape[-1]).sum(2).float()  # [layers, tokens, E]
    return (chosen.mean(1) / k).tolist()


def routing_change(before: torch.Tensor, after: torch.Tensor, k: int) -> dict[str, float]:
    """Fraction of (layer, token) pairs whose top-k expert set changed; mean total variation between the
    router's distributions; mean over layers of the total variation between the expert loads."""
    changed = (top_k(before, k) != top_k(after, k)).any(-1).float().mean()
    tv = 0.5 * (before - after).abs().sum(-1).mean()
    loads = 0.5 * np.abs(np.array(expert_load(before, k)) - np.array(expert_load(after, k))).sum(-1).mean()
    return {"topk_changed": float(changed), "tv": float(tv), "load_tv": float(loads)}


def routed_run(out_dir: Path, overrides: dict[str, Any], size: str, start: dict[str, torch.Tensor], tokenizer: Any,
               token_sets: dict[str, list[dict[str, Any]]], k: int) -> dict[str, Any]:
    """Train with a checkpoint every EVERY steps, compare each one's routing on each token set with the start's,
    keep only the routing curves, the final loads and the run's logs (cached)."""
    path = out_dir / "routing.json"
    if path.exists():
        return json.loads(path.read_text())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    every = EVERY[size]
    summary = mmopd.train(load_config(None, {**overrides, "train.out_dir": str(out_dir), "train.resume": "never",
                                             "train.save_every": every, "train.eval_every": every}))
    steps, probs = [0], [dict(start)]
    for step in range(every, summary["steps"] + 1, every):
        model = transformers.AutoModelForCausalLM.from_pretrained(out_dir / "checkpoints" / f"step-{step}" / "model")
        steps.append(step)
        probs.append({name: router_probs(model, tokenizer, records) for name, records in token_sets.items()})
    routing: dict[str, Any] = {"steps": steps}
    for name in token_sets:
        changes = [routing_change(start[name], p[name], k) for p in probs]
        routing[name] = {**{key: [c[key] for c in changes] for key in changes[0]},
                         "load": expert_load(probs[-1][name], k)}
    shutil.rmtree(out_dir / "checkpoints")
    path.write_text(json.dumps(routing))
    return routing


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Every run for every seed, the MoE student's first; write results_moe_routing.png, .json and .md after
    each seed, so that a cut-short run keeps what finished."""
    task = build_task(out, size)
    models = {"student": build_moe(out / NAME / "models", "student", task, size)}
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["student"]["path"])
    records = read_records(task["paths"]["eval"], ROUTING_RECORDS[size])
    student = transformers.AutoModelForCausalLM.from_pretrained(models["student"]["path"]).eval()
    k = student.config.num_experts_per_tok
    own = sample(student, tokenizer, [r["prompt"] for r in records], SIZES[size]["max_new_tokens"], seed=1)
    token_sets = {"answers": records, "samples": [{"prompt": r["prompt"], "answer": tokenizer.decode(
        ids, skip_special_tokens=True)} for r, ids in zip(records, own)]}
    start = {name: router_probs(student, tokenizer, recs) for name, recs in token_sets.items()}
    base = {**base_overrides(task, size), "train.steps": STEPS[size], "train.eval_every": EVERY[size]}
    moe_flops = {**task, "params": {**task["params"], "student": models["student"]["active_params"]}}
    moe_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in (*MOE_METHODS, "sft_flops")}
    dense_runs: dict[str, list[dict[str, Any]]] = {"moe_teacher": [], "dense_teacher": []}
    result = {"steps": STEPS[size], "routing_records": len(records),
              "routing_tokens": {name: int(probs.shape[1]) for name, probs in start.items()},
              "models": models, "moe_runs": moe_runs, "dense_runs": dense_runs}
    for seed in SIZES[size]["seeds"]:
        for name, overrides in MOE_METHODS.items():
            run_dir = out / NAME / "runs" / "moe_student" / name / f"seed{seed}"
            routing = routed_run(run_dir, {**base, **overrides, "student.path": models["student"]["path"],
                                           "train.seed": seed}, size, start, tokenizer, token_sets, k)
            moe_runs[name].append({**curve(run_dir, moe_flops), "routing": routing})
        publish(out, result, root)
    steps = flops_matched_steps(moe_runs["on_policy"][0], moe_runs["sft"][0], STEPS[size], EVERY[size])
    for seed in SIZES[size]["seeds"]:
        run_dir = out / NAME / "runs" / "moe_student" / "sft_flops" / f"seed{seed}"
        routing = routed_run(run_dir, {**base, **MOE_METHODS["sft"], "student.path": models["student"]["path"],
                                       "train.seed": seed, "train.steps": steps}, size, start, tokenizer, token_sets, k)
        moe_runs["sft_flops"].append({**curve(run_dir, moe_flops), "routing": routing})
        publish(out, result, root)
    models["teacher"] = build_moe(out / NAME / "models", "teacher", task, size)
    teachers = {"moe_teacher": models["teacher"]["path"], "dense_teacher": task["paths"]["teacher"]}
    flops = {"moe_teacher": {**task, "params": {**task["params"], "teacher": models["teacher"]["active_params"]}},
             "dense_teacher": task}
    for seed in SIZES[size]["seeds"]:
        for name, path in teachers.items():
            run_dir = run_config(out / NAME / "runs" / "dense_student" / name / f"seed{seed}",
                                 {**base, **MOE_METHODS["on_policy"], "teacher.path": path, "train.seed": seed})
            dense_runs[name].append(curve(run_dir, flops[name]))
        publish(out, result, root)
    return result


def flops_matched_steps(on_policy: dict[str, Any], sft: dict[str, Any], steps: int, every: int) -> int:
    """SFT steps that spend at least the on-policy run's FLOPs, rounded up to a multiple of `every`."""
    return every * math.ceil(on_policy["flops"][-1] / (sft["flops"][-1] / steps) / every)


def publish(out: Path, result: dict[str, Any], root: Path | None) -> None:
    """The plot, the JSON and the table of what has run so far."""
    plot(result, out / f"results_{NAME}.png")
    save_results(out, NAME, result, table(result), root)


def loads_text(load: list[list[float]]) -> str:
    """'L0 0.31/0.19/0.25/0.25; L1 ...' for a per-layer list of expert loads."""
    return "; ".join(f"L{i} " + "/".join(f"{x:.2f}" for x in layer) for i, layer in enumerate(load))


def table(result: dict[str, Any]) -> str:
    """Markdown: the MoE student's routing and accuracy per method, then the dense student per teacher (once run)."""
    s = result["models"]["student"]
    lines = [f"| MoE student ({s['active_params']:,} of {s['params']:,} parameters active) | seeds | steps | TFLOPs | "
             "final accuracy | top-2 set changed, answers | top-2 set changed, own samples | router TV, answers | "
             "router TV, own samples | expert load TV, answers | expert load on answers (mean over seeds) |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| start ({s['sft_steps']} SFT steps) | – | 0 | 0 | {s['accuracy']:.3f} | 0 | 0 | 0 | 0 | 0 | "
             f"{loads_text(s['load'])} |"]
    for name, runs in ((n, r) for n, r in result["moe_runs"].items() if r):
        last = {(tokens, key): [r["routing"][tokens][key][-1] for r in runs] for tokens in ("answers", "samples")
                for key in ("topk_changed", "tv", "load_tv")}
        load = np.mean([r["routing"]["answers"]["load"] for r in runs], 0).tolist()
        lines.append(f"| {LABELS[name]} | {len(runs)} | {runs[0]['routing']['steps'][-1]} | "
                     f"{runs[0]['flops'][-1] / 1e12:.3g} | {mean_std([r['accuracy'][-1] for r in runs])} | "
                     + " | ".join(mean_std(last[(tokens, key)]) for key in ("topk_changed", "tv")
                                  for tokens in ("answers", "samples"))
                     + f" | {mean_std(last[('answers', 'load_tv')])} | {loads_text(load)} |")
    teacher_accuracy = result["moe_runs"]["on_policy"][0]["teacher"]
    tokens = result["routing_tokens"]
    lines.append(f"\nDense teacher accuracy {teacher_accuracy:.3f}. Routing on {result['routing_records']} held-out "
                 f"prompts, teacher-forced, with their dataset answers ({tokens['answers']} tokens) and with one "
                 f"sample each of the start student ({tokens['samples']} tokens); a change is the fraction of "
                 "token·layer pairs; TV: total variation. Accuracy: greedy exact match on the eval prompts; mean ± "
                 "std over the seeds.\n")
    dense = {name: runs for name, runs in result["dense_runs"].items() if runs}
    if not dense:
        return "\n".join(lines) + "\n"
    t = result["models"]["teacher"]
    start = next(iter(dense.values()))[0]["student_before"]
    lines += [f"| dense toy student (start {start:.3f}) | teacher accuracy | seeds | steps | TFLOPs | final accuracy | "
              "share of the gap to the teacher closed |", "|---|---|---|---|---|---|---|"]
    accuracy = {"moe_teacher": t["accuracy"], "dense_teacher": teacher_accuracy}
    for name, runs in dense.items():
        lines.append(f"| {LABELS[name]} | {accuracy[name]:.3f} | {len(runs)} | {result['steps']} | "
                     f"{runs[0]['flops'][-1] / 1e12:.3g} | {mean_std([r['accuracy'][-1] for r in runs])} | "
                     f"{gap_closed([r['accuracy'][-1] for r in runs], start, accuracy[name])} |")
    lines.append(f"\nMoE teacher: {t['active_params']:,} of {t['params']:,} parameters active, {t['sft_steps']} SFT "
                 f"steps ({t['seconds']:.0f} s), accuracy {t['accuracy']:.3f}, expert load {loads_text(t['load'])}.")
    return "\n".join(lines) + "\n"


def gap_closed(finals: list[float], start: float, teacher: float) -> str:
    """(final − start) / (teacher − start) over seeds, or '–' where the teacher is no better than the start."""
    if teacher <= start:
        return "–"
    return mean_std([(final - start) / (teacher - start) for final in finals], ".2f")


def plot(result: dict[str, Any], path: Path) -> None:
    """Routing change and accuracy against steps (mean ± std band), and the expert loads before and after."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for color, (name, runs) in zip(("C0", "C1", "C2"), ((n, r) for n, r in result["moe_runs"].items() if r)):
        steps = np.array(runs[0]["routing"]["steps"])
        for tokens, style in (("answers", "-"), ("samples", ":")):
            ys = np.array([r["routing"][tokens]["topk_changed"] for r in runs])
            axes[0].plot(steps, ys.mean(0), style, color=color, label=f"{LABELS[name]}, on {tokens}")
            axes[0].fill_between(steps, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=color, alpha=0.2)
    for group, style, runs_by in (("MoE student", "-", result["moe_runs"]), ("dense student", "--",
                                                                             result["dense_runs"])):
        for name, runs in ((n, r) for n, r in runs_by.items() if r):
            steps = np.array(runs[0]["steps"])
            ys = np.array([r["accuracy"] for r in runs])
            line, = axes[1].plot(steps, ys.mean(0), style, label=f"{group}: {LABELS[name]}")
            axes[1].fill_between(steps, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=line.get_color(),
                                 alpha=0.2)
    bars = {"start": np.array(result["models"]["student"]["load"]),
            **{LABELS[name]: np.mean([r["routing"]["answers"]["load"] for r in runs], 0)
               for name, runs in result["moe_runs"].items() if runs}}
    layers, experts = bars["start"].shape
    x = np.arange(layers * experts)
    width = 0.8 / len(bars)
    for i, (color, (label, load)) in enumerate(zip(("grey", "C0", "C1", "C2"), bars.items())):
        axes[2].bar(x + (i - (len(bars) - 1) / 2) * width, load.flatten(), width=width, color=color, label=label)
    axes[2].set_xticks(x, [f"L{l}E{e}" for l in range(layers) for e in range(experts)])
    axes[2].axhline(1 / experts, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("MoE student: fraction of token·layers whose top-2 changed")
    axes[1].set_ylabel("eval accuracy (exact match, greedy)")
    axes[2].set_ylabel("MoE student: expert load on answers (fraction of slots)")
    for ax in axes[:2]:
        ax.set_xlabel("training step (64 prompts each)")
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"MoE routing under OPD and SFT, text toy; mean ± std over {len(result['moe_runs']['sft'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
