"""Sparse teachers are easy to distil: OPD cost against the size of the teacher's difference from the student.

    python -m experiments sparse_teacher [--out DIR] [--size tiny|full] [--publish]

Teachers made from the text toy's student S (150 SFT steps, accuracy 0.30) by a few more SFT steps on the
answers (40, 100, 250 at lr 1e-3 after 20 warmup steps: small updates of increasing size); the RL teacher, S trained
by mmopd's own reward-only RL (the exact-match reward, `objective.kl_weight` 0, no teacher: the seed's case); and the
broad teacher (the toy's own, a larger model trained from scratch, accuracy 1.00). For each teacher, on one S sample
of each of KL_PROMPTS held-out prompts: the reverse KL(S ‖ teacher) summed over the response (what OPD minimises,
exact per token), the forward KL(teacher ‖ S) on the same samples, and the fraction of response positions where the
two models' argmax differ. Then OPD (full reverse KL) from S to each teacher at the toy's settings and at a lower lr,
3 seeds, and the steps and FLOPs until the student's greedy eval accuracy first recovers 50% and 90% of the
teacher's gain over S. What the RL teacher writes is checked too (`rl_record`): its held-out answers' format, column
sums and variety beside S's and the broad teacher's.

At the full size, an arm and seed whose run is not in --out but is in the published results (docs/results/
sparse_teacher.json) is taken from there, with its teacher's difference from its student, and listed under `reused`,
so that new arms can be added without rerunning the old ones; delete that file (or its arm) to rerun them. The toy
is rebuilt in --out, and a rebuild need not give the same S to the bit (another torch, another S): each arm's gain
is measured from its own run's S, and the table sets this build's teachers' differences beside the reused ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from experiments.self_distill import sample  # noqa: E402
from experiments.text_task import SIZES, base_overrides, build_task, curve, mean_std, run_config, save_results  # noqa: E402
from modalities.text.adapter import is_correct, prompt_text  # noqa: E402

NAME = "sparse_teacher"
# SFT steps of each narrow teacher; a fresh AdamW at the toy's lr without warmup first drops S's accuracy (to 0.0
# after 10 steps at 2e-3), hence the lower lr and the warmup
NARROW = {"full": {"sft_40": 40, "sft_100": 100, "sft_250": 250}, "tiny": {"sft_1": 1, "sft_2": 2}}
NARROW_LR, NARROW_WARMUP = {"full": 1e-3, "tiny": 1e-3}, {"full": 20, "tiny": 0}
# the RL teacher: S trained by the exact-match reward alone (plain on-policy RL), `samples` per prompt at
# `temperature` with the prompt's mean reward as baseline, lr after a warmup (a REINFORCE probe without one lowered
# S's accuracy, as SFT without one does); `every`: its eval interval. Measured here (greedy accuracy on the 200 eval
# prompts, S 0.31): at temperature 1 or 0.7 and lr 3e-5 to 1e-4 it fell (to 0.04-0.30), at 0.7 and 1e-5 it gained
# 0.035 in 150 steps; at 0.3 (S's samples right 18% of the time, against 3% at 1) it gained 0.045 at 2e-5 and 0.05
# at these settings, 0.035 with 64 prompts a step at 8e-5 (RESULTS.md section 10)
RL = {"full": {"steps": 300, "batch_size": 16, "samples": 8, "temperature": 0.3, "lr": 6e-5, "warmup": 30, "every": 25},
      "tiny": {"steps": 2, "batch_size": 2, "samples": 2, "temperature": 1.0, "lr": 1e-3, "warmup": 0, "every": 1}}
OPD_STEPS = {"full": 200, "tiny": 4}
# OPD at the toy's lr for every teacher, and at a lower lr: AdamW's steps have the lr's size however small the KL's
# gradient, so a near teacher may need a smaller lr to be cheap
LOW_LR = {"full": 5e-4, "tiny": 5e-4}
EVERY = {"full": 10, "tiny": 2}
KL_PROMPTS = {"full": 200, "tiny": 4}
FRACTIONS = (0.5, 0.9)  # of the teacher's gain over the student, and of the KL from the student to the teacher
WINDOW = {"full": 10, "tiny": 2}  # steps of the trailing mean of the training batches' KL
PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "results" / f"{NAME}.json"
WELL_FORMED = re.compile(r"(\d\d;)+#\d+")  # the toy's answer format: column sums, then the final sum


def response_batch(tokenizer: Any, prompts: list[str], responses: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Prompt + response ids right-padded [B, L], their attention mask [B, L], and a mask [B, L - 1] of the
    positions whose next token is a response token (the positions that predict the response)."""
    prompt_ids = [tokenizer(prompt_text(p, tokenizer), add_special_tokens=not tokenizer.chat_template)["input_ids"]
                  for p in prompts]
    length = max(len(p) + len(r) for p, r in zip(prompt_ids, responses))
    ids = torch.full((len(prompts), length), tokenizer.pad_token_id)
    attention = torch.zeros(len(prompts), length, dtype=torch.long)
    predicts = torch.zeros(len(prompts), length - 1, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_ids, responses)):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        attention[b, :len(p) + len(r)] = 1
        predicts[b, len(p) - 1:len(p) + len(r) - 1] = True
    return ids, attention, predicts


def narrow_teacher(task: dict[str, Any], size: str, steps: int, out_dir: Path) -> str:
    """The student after `steps` more SFT steps on the answers (warmup, then cosine to 0), built once."""
    overrides = {**base_overrides(task, size), "objective.kind": "sft", "train.steps": steps,
                 "train.lr": NARROW_LR[size], "train.warmup": NARROW_WARMUP[size], "train.eval_every": 0,
                 "train.seed": 0}
    return str(run_config(out_dir, overrides) / "final")


def rl_teacher(task: dict[str, Any], size: str, out_dir: Path) -> Path:
    """The run dir of S after reward-only RL (objective.reward exact_match, kl_weight 0, no teacher), built once;
    its student is out_dir/final."""
    r = RL[size]
    overrides = {**base_overrides(task, size), "teacher.path": "", "objective.kind": "on_policy",
                 "objective.reward": "exact_match", "objective.reward_weight": 1.0, "objective.kl_weight": 0.0,
                 "rollout.samples_per_prompt": r["samples"], "rollout.temperature": r["temperature"],
                 "train.batch_size": r["batch_size"], "train.steps": r["steps"], "train.lr": r["lr"],
                 "train.warmup": r["warmup"], "train.eval_every": r["every"], "train.seed": 0}
    return run_config(out_dir, overrides)


def answers_check(model: Any, tokenizer: Any, records: list[dict], max_new_tokens: int) -> dict[str, Any]:
    """What a model writes for these prompts, greedy: the share of responses in the toy's format (column sums, then
    the final sum), with every column sum right, with the right final answer, the number of distinct responses,
    the mean length in characters, and the first five (a degenerate policy writes few distinct or malformed ones)."""
    enc = tokenizer([r["prompt"] for r in records], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = [t.strip() for t in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    columns = [t.rsplit("#", 1)[0] == r["answer"].rsplit("#", 1)[0] for t, r in zip(texts, records)]
    return {"well_formed": float(np.mean([bool(WELL_FORMED.fullmatch(t)) for t in texts])),
            "columns_right": float(np.mean(columns)),
            "correct": float(np.mean([is_correct(t, r["answer"]) for t, r in zip(texts, records)])),
            "prompts": len(texts), "distinct": len(set(texts)), "mean_chars": float(np.mean([len(t) for t in texts])),
            "examples": [{"prompt": r["prompt"], "answer": r["answer"], "response": t}
                         for t, r in zip(texts[:5], records[:5])]}


def rl_record(run_dir: Path, paths: dict[str, str], tokenizer: Any, records: list[dict], size: str) -> dict[str, Any]:
    """The RL teacher's training (its eval accuracy by step, its mean training reward per `every` steps and the
    share of prompts whose samples all got the same reward) and what it, S and the broad teacher write."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "reward/mean" in r]
    every = RL[size]["every"]
    chunks = [trained[i:i + every] for i in range(0, len(trained), every)]
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    models = {"student": paths["student"], "rl": str(run_dir / "final"), "broad": paths["teacher"]}
    return {"eval_steps": sorted(evals), "eval_accuracy": [evals[k] for k in sorted(evals)],
            "reward_steps": [c[-1]["step"] for c in chunks],
            "reward_mean": [float(np.mean([r["reward/mean"] for r in c])) for c in chunks],
            "all_equal_share": [float(np.mean([r["reward/all_equal_share"] for r in c])) for c in chunks],
            "answers": {name: answers_check(transformers.AutoModelForCausalLM.from_pretrained(path).eval(),
                                            tokenizer, records, SIZES[size]["max_new_tokens"])
                        for name, path in models.items()}}


def published_results(size: str) -> dict[str, Any]:
    """The published results, at the full size (their curves per arm, one per seed, are runs an arm can take from
    there instead of training again); empty at the tiny size or where there are none."""
    if size != "full" or not PUBLISHED.exists():
        return {}
    return json.loads(PUBLISHED.read_text())


def difference(teacher: Any, student: Any, tokenizer: Any, prompts: list[str],
               responses: list[list[int]]) -> dict[str, float]:
    """On the student's responses: mean per sequence of Σ_t KL(student ‖ teacher) and of Σ_t KL(teacher ‖
    student) (exact per token), and the fraction of response positions where the two argmax differ."""
    ids, attention, predicts = response_batch(tokenizer, prompts, responses)
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
        logq = torch.log_softmax(student(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
    reverse = (logq.exp() * (logq - logp)).sum(-1) * predicts  # [B, L - 1]
    forward = (logp.exp() * (logp - logq)).sum(-1) * predicts
    differs = (logp.argmax(-1) != logq.argmax(-1)) & predicts
    return {"reverse_kl": float(reverse.sum(-1).mean()), "forward_kl": float(forward.sum(-1).mean()),
            "argmax_differs": float(differs.sum() / predicts.sum())}


def batch_kl(run_dir: Path) -> list[float]:
    """Per OPD step, the reverse KL per sequence on that step's batch: the logged loss (the mean over response
    tokens of the exact per-token KL) times the mean response length."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["divergence"] * r["response_len"] for r in rows if "divergence" in r]


def trailing_mean(kl: list[float], window: int) -> np.ndarray:
    """means[i]: the mean of the batch KL over steps i + 1 .. i + window."""
    return np.convolve(kl, np.ones(window) / window, mode="valid")


def kl_closed(kl: list[float], fraction: float, window: int) -> int | None:
    """The first step whose trailing window-step mean of the batch KL is at most (1 - fraction) times the mean
    over the first window steps (the KL at the start), or None."""
    means = trailing_mean(kl, window)
    below = np.nonzero(means <= (1 - fraction) * means[0])[0]
    return int(below[0]) + window if len(below) else None


def first_reaching(c: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """Step and cumulative FLOPs of the first eval at or above target, or (None, None)."""
    for step, acc, flops in zip(c["steps"], c["accuracy"], c["flops"]):
        if acc >= target:
            return step, flops
    return None, None


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Build the teachers, measure each one's difference from the student, distil each for every seed; write
    results_sparse_teacher.png, .json and .md after every seed."""
    task = build_task(out, size)
    p = task["paths"]
    teachers = {name: narrow_teacher(task, size, steps, out / NAME / "teachers" / name)
                for name, steps in NARROW[size].items()}
    rl_dir = rl_teacher(task, size, out / NAME / "teachers" / "rl")
    teachers["rl"] = str(rl_dir / "final")
    teachers["broad"] = p["teacher"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(p["student"])
    student = transformers.AutoModelForCausalLM.from_pretrained(p["student"]).eval()
    records = [json.loads(line) for line in Path(p["eval"]).read_text().splitlines()]  # held out
    prompts = [r["prompt"] for r in records[:KL_PROMPTS[size]]]
    rl = rl_record(rl_dir, p, tokenizer, records, size)
    responses = sample(student, tokenizer, prompts, SIZES[size]["max_new_tokens"], seed=1)
    differences = {name: difference(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), student,
                                    tokenizer, prompts, responses) for name, path in teachers.items()}
    base = {**base_overrides(task, size), "objective.kind": "on_policy", "objective.estimator": "full",
            "train.steps": OPD_STEPS[size], "train.eval_every": EVERY[size]}
    params = {name: {**task["params"], "teacher": sum(x.numel() for x in transformers.AutoModelForCausalLM
                                                      .from_pretrained(path).parameters())}
              for name, path in teachers.items()}  # the FLOPs of each teacher's forward
    arms = {name: (name, SIZES[size]["lr"]) for name in teachers}  # arm -> (teacher, OPD lr)
    arms.update({f"{name}_lr{LOW_LR[size]:g}": (name, LOW_LR[size]) for name in teachers})
    curves: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    published, reused = published_results(size), {}
    for i, seed in enumerate(SIZES[size]["seeds"]):  # results are written after every seed: a cut-short run keeps them
        for arm, (name, lr) in arms.items():
            run_dir = out / NAME / "runs" / arm / f"seed{seed}"
            if not (run_dir / "summary.json").exists() and len(published.get("curves", {}).get(arm, ())) > i:
                curves[arm].append(published["curves"][arm][i])
                reused.setdefault(arm, []).append(seed)
                continue
            run_config(run_dir, {**base, "teacher.path": teachers[name], "train.lr": lr, "train.seed": seed})
            curves[arm].append({**curve(run_dir, {**task, "params": params[name]}), "batch_kl": batch_kl(run_dir)})
        by_arm = {arm: {k: published["arms"][arm][k] for k in differences[name]} if arm in reused
                  else differences[name] for arm, (name, _) in arms.items()}  # each run's teacher against its S
        result = {**summarize(curves, arms, by_arm, WINDOW[size]), "rl_teacher": {**RL[size], **rl},
                  "reused": reused, "differences_here": differences}
        plot(result, out / f"results_{NAME}.png")
        save_results(out, NAME, result, table(result), root)
    return result


def summarize(curves: dict[str, list[dict[str, Any]]], arms: dict[str, tuple[str, float]],
              differences: dict[str, dict[str, float]], window: int) -> dict[str, Any]:
    """Per arm (teacher and OPD lr): the student's and the teacher's accuracy, the teacher's difference from the
    student (`differences` by arm), and per seed the steps and FLOPs to each fraction of its gain and of the KL (None
    where not reached) and the final accuracy."""
    rows = {}
    for arm, cs in curves.items():
        name, lr = arms[arm]
        start, accuracy = cs[0]["student_before"], cs[0]["teacher"]
        gain = accuracy - start  # a teacher no better than the student (the tiny size's) has no gain to recover
        row: dict[str, Any] = {"teacher": name, "lr": lr, "student_accuracy": start, "teacher_accuracy": accuracy,
                               "gain": gain, **differences[arm],
                               "final_accuracy": [c["accuracy"][-1] for c in cs],
                               "recovered_final": [(c["accuracy"][-1] - start) / gain if gain > 0 else None
                                                   for c in cs]}
        for fraction in FRACTIONS:
            reached = [first_reaching(c, start + fraction * gain) if gain > 0 else (None, None) for c in cs]
            row[f"steps_{fraction}"] = [s for s, _ in reached]
            row[f"tflops_{fraction}"] = [None if f is None else f / 1e12 for _, f in reached]
            row[f"kl_steps_{fraction}"] = [kl_closed(c["batch_kl"], fraction, window) for c in cs]
        rows[arm] = row
    first = next(iter(curves.values()))[0]
    return {"narrow_steps": {**NARROW["full"], **NARROW["tiny"]},
            "opd_steps": first["steps"][-1], "window": window, "seeds": len(next(iter(curves.values()))),
            "arms": rows, "curves": curves}


def reached(values: list[Any], fmt: str) -> str:
    """mean ± std over the seeds that reached, with how many did when not all; 'not reached' for none."""
    hits = [v for v in values if v is not None]
    if not hits:
        return "not reached"
    return mean_std(hits, fmt) + ("" if len(hits) == len(values) else f" ({len(hits)}/{len(values)} seeds)")


def gain_cell(r: dict[str, Any], key: str, fmt: str) -> str:
    """reached(...) of a gain-based entry; 'no gain' for a teacher no better than the student."""
    return reached(r[key], fmt) if r["gain"] > 0 else "no gain"


def label(r: dict[str, Any], result: dict[str, Any]) -> str:
    """'S + 40 SFT steps, OPD lr 0.0005', 'S + 300 reward-only RL steps, OPD lr 0.002' or 'broad (the toy's
    teacher), OPD lr 0.002'."""
    teacher = {"broad": "broad (the toy's teacher)", "rl": f"S + {result['rl_teacher']['steps']} reward-only RL steps"}
    name = teacher.get(r["teacher"]) or f"S + {result['narrow_steps'][r['teacher']]} SFT steps"
    return f"{name}, OPD lr {r['lr']:g}"


def table(result: dict[str, Any]) -> str:
    """Markdown: each teacher's difference from the student and the OPD cost to recover its gain."""
    lines = ["| teacher | teacher accuracy | KL(S ‖ T) per sequence | KL(T ‖ S) per sequence | argmax differs | "
             "OPD steps to 50% of the gain | to 90% | TFLOPs to 90% | steps to 50% of the KL closed | to 90% | "
             f"gain recovered after {result['opd_steps']} steps |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, r in result["arms"].items():
        mark = " *" if arm in result["reused"] else ""
        lines.append(f"| {label(r, result)}{mark} | {r['teacher_accuracy']:.3f} | "
                     f"{r['reverse_kl']:.3f} | {r['forward_kl']:.3f} | {r['argmax_differs']:.3f} | "
                     f"{gain_cell(r, 'steps_0.5', '.0f')} | {gain_cell(r, 'steps_0.9', '.0f')} | "
                     f"{gain_cell(r, 'tflops_0.9', '.3f')} | {reached(r['kl_steps_0.5'], '.0f')} | "
                     f"{reached(r['kl_steps_0.9'], '.0f')} | {gain_cell(r, 'recovered_final', '.2f')} |")
    lines.append(f"\nStudent S (the text toy's student) accuracy {students(result)} (greedy exact "
                 f"match). KLs (nats) and argmax on {KL_PROMPTS['full']} held-out prompts, one S sample each. Gain "
                 f"steps: the first eval (every {EVERY['full']} steps) at or above S + fraction × (teacher − S). "
                 f"KL steps: the first step where the mean of the last {result['window']} training batches' KL(student "
                 f"‖ teacher) per sequence is at most (1 − fraction) × that of the first {result['window']}. Mean ± std over "
                 f"{result['seeds']} seeds." + rebuild_note(result))
    return "\n".join(lines) + "\n" + rl_table(result)


def students(result: dict[str, Any]) -> str:
    """S's accuracy; where runs were reused from another build of the toy, S's in this build and in theirs."""
    here = {r["student_accuracy"] for arm, r in result["arms"].items() if arm not in result["reused"]}
    there = {r["student_accuracy"] for arm, r in result["arms"].items() if arm in result["reused"]}
    if not there or here == there:
        return ", ".join(f"{x:.3f}" for x in sorted(here | there))
    return (f"{', '.join(f'{x:.3f}' for x in sorted(here))} in this build of the toy, "
            f"{', '.join(f'{x:.3f}' for x in sorted(there))} in the reused runs' build")


def rebuild_note(result: dict[str, Any]) -> str:
    """For reused runs (marked *): that they were not rerun, and this build's teachers' differences from its S beside
    the ones the reused runs distilled."""
    reused = {r["teacher"]: r for arm, r in result["arms"].items() if arm in result["reused"]}
    if not reused:
        return ""
    keys = (("reverse_kl", "KL(S ‖ T)"), ("forward_kl", "KL(T ‖ S)"), ("argmax_differs", "argmax differs"))
    pairs = "; ".join(name + ": " + ", ".join(f"{what} {result['differences_here'][name][key]:.3f} (reused {r[key]:.3f})"
                                              for key, what in keys) for name, r in reused.items())
    return (" *: OPD runs taken from the published results (docs/results/sparse_teacher.json), not rerun; their "
            f"teachers' differences from S are theirs. This build's teachers: {pairs}.")


def rl_table(result: dict[str, Any]) -> str:
    """Markdown: how the RL teacher trained, and what it, S and the broad teacher write on the held-out prompts."""
    rl = result["rl_teacher"]
    lines = [f"\nThe RL teacher: S trained by the exact-match reward alone (`objective.kl_weight` 0, no teacher) for "
             f"{rl['steps']} steps of {rl['batch_size']} prompts × {rl['samples']} samples at temperature "
             f"{rl['temperature']:g} (the prompt's mean reward as baseline), lr {rl['lr']:g} after {rl['warmup']} "
             "warmup steps, cosine to 0. Greedy eval accuracy by step: "
             + ", ".join(f"{k}: {a:.3f}" for k, a in zip(rl["eval_steps"], rl["eval_accuracy"]))
             + ". Mean training reward per block of steps (ending at): "
             + ", ".join(f"{k}: {m:.3f}" for k, m in zip(rl["reward_steps"], rl["reward_mean"]))
             + "; prompts whose samples all got the same reward: "
             + ", ".join(f"{x:.2f}" for x in rl["all_equal_share"]) + ".",
             "", "| model | greedy answers right | in the toy's format | every column sum right | distinct answers | "
             "mean length (characters) | first answers (prompt → response) |", "|---|---|---|---|---|---|---|"]
    names = {"student": "S", "rl": "RL teacher", "broad": "broad teacher"}
    for name, a in rl["answers"].items():
        examples = "; ".join(f"`{e['prompt']}{e['response']}`" for e in a["examples"][:3])
        lines.append(f"| {names[name]} | {a['correct']:.3f} | {a['well_formed']:.3f} | {a['columns_right']:.3f} | "
                     f"{a['distinct']} of {a['prompts']} | "
                     f"{a['mean_chars']:.1f} | {examples} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Left: OPD steps to 50% of the gain and of the KL closed against the initial KL(S ‖ T), per lr; middle:
    the gain recovered against steps; right: the training batches' KL against steps (means over seeds)."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    arms = result["arms"]
    lrs = sorted({r["lr"] for r in arms.values()}, reverse=True)
    styles = dict(zip(lrs, ("-", "--")))
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r["teacher"] for r in arms.values()))}
    for lr in lrs:
        for key, marker, what in (("steps_0.5", "o", "50% of the gain"), ("kl_steps_0.5", "s", "50% of the KL")):
            points = [(r["reverse_kl"], [s for s in r[key] if s is not None]) for r in arms.values()
                      if r["lr"] == lr and (key.startswith("kl") or r["gain"] > 0)]
            points = sorted((x, hits) for x, hits in points if hits)
            axes[0].errorbar([x for x, _ in points], [np.mean(h) for _, h in points],
                             yerr=[np.std(h) for _, h in points], marker=marker, capsize=3, linestyle=styles[lr],
                             color="C0" if key.startswith("kl") else "C3", label=f"{what}, OPD lr {lr:g}")
    for arm, r in arms.items():
        cs, color, style = result["curves"][arm], colors[r["teacher"]], styles[r["lr"]]
        tag = f"{label(r, result)} (KL {r['reverse_kl']:.2f})"
        kl = np.array([trailing_mean(c["batch_kl"], result["window"]) for c in cs])
        axes[2].plot(np.arange(result["window"], result["window"] + kl.shape[1]), kl.mean(0), color=color,
                     linestyle=style, label=tag)
        if r["gain"] > 0:
            ys = np.array([(np.array(c["accuracy"]) - r["student_accuracy"]) / r["gain"] for c in cs])
            axes[1].plot(cs[0]["steps"], ys.mean(0), color=color, linestyle=style, label=tag)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("initial KL(S ‖ T) per sequence on S's samples (nats)")
    axes[0].set_ylabel("OPD steps (64 prompts each)")
    axes[1].axhline(0.9, color="grey", linestyle=":", linewidth=0.8)
    axes[1].set_xlabel("OPD step")
    axes[1].set_ylabel("fraction of the teacher's accuracy gain recovered")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("OPD step")
    axes[2].set_ylabel(f"KL(student ‖ T) per sequence, batches ({result['window']}-step mean)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # the tiny size's teachers have no gain to plot
            ax.legend(fontsize=7)
    fig.suptitle(f"OPD from the student S to teachers T of growing difference, text toy; mean over "
                 f"{result['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
