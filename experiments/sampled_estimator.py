"""What does the sampled-token estimator need to learn? Remedies, its gradient's noise, and sequences per step,
on the text toy.

    python -m experiments sampled_estimator [--out DIR] [--size tiny|full] [--publish]

From compute_matched's student, with its lr and schedule (compute_matched's on_policy runs are reused when --out
is shared), three parts:

1. Remedies at the full KL's budget (200 steps of 64 sequences): the sampled estimator as it is, with 4 samples per
   prompt (16 prompts a step, so the same 64 sequences), with a leave-one-out baseline over those 4
   (`objective.baseline: loo`) or over the batch's 64 sequences (`batch`), with its log-ratio clipped
   (`objective.advantage_clip`), verl's k3 (`objective.sampled_kl: k3`), and LoRA at a lower lr. Every variant runs
   the first seed; the CONFIRM best on it, the plain estimator and the full KL run the others.
2. The gradient at the student start, through the trainer's own step (`objective_step`: its rollout, teacher,
   loss and backward) on GRADIENT_BATCHES batches of 64 sequences: each estimator's gradient against the full
   reverse KL's on the same sequences (the per-batch cosine, the cosine of the gradients summed over the batches,
   the regression coefficient ⟨g, g_full⟩ / |g_full|²), each one's per-batch signal |E g|² (mean over i ≠ j of
   ⟨g_i, g_j⟩) and noise (mean |g_i|² − |E g|²), the mean k against the exact KL, and the share of the plain
   estimator's noise carried by the tokens the teacher rules out (k > EXCLUDED).
3. Sequences per step: the full reverse KL and the sampled estimator at 64, 256 and 512 sequences a step
   (`train.batch_size`: one sample a prompt, one micro-batch, so the loss is the token mean over all of them), 200
   steps each, every seed. Accuracy against sequences per step and against estimated FLOPs
   (text_task.step_flops).

Quality: eval accuracy, and its share of the full reverse KL's at the end.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments.compute_matched import THRESHOLD, first_reach, method_runs  # noqa: E402
from experiments.text_task import SIZES, band, base_overrides, mean_std, save_results  # noqa: E402
from mmopd.config import load_config  # noqa: E402
from mmopd.data.step_order import step_indices  # noqa: E402
from mmopd.run.objectives import Models, Plan, Timer, objective_step  # noqa: E402
from mmopd.run.session import Session  # noqa: E402
from mmopd.step.batch import Rollout  # noqa: E402
from mmopd.step.scores import Scores  # noqa: E402

NAME = "sampled_estimator"
SAMPLED = {"objective.kind": "on_policy", "objective.estimator": "sampled"}
GROUPS = {"train.batch_size": 16, "rollout.samples_per_prompt": 4}  # 64 sequences a step, as the full KL's
CLIP = 1.0
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "sampled_n4": ({**SAMPLED, **GROUPS}, "sampled, 16 prompts × 4 samples"),
    "sampled_n4_loo": ({**SAMPLED, **GROUPS, "objective.baseline": "loo"},
                       "sampled, 16 × 4, leave-one-out baseline"),
    "sampled_batch": ({**SAMPLED, "objective.baseline": "batch"}, "sampled, batch leave-one-out baseline"),
    "sampled_clip": ({**SAMPLED, "objective.advantage_clip": CLIP}, f"sampled, log-ratio clipped to ±{CLIP:g}"),
    "sampled_k3": ({**SAMPLED, "objective.sampled_kl": "k3"}, "sampled, verl's k3 (low_var_kl)"),
    "sampled_lora": ({**SAMPLED, "student.trainable": "lora", "train.lr": 1e-3}, "sampled, LoRA r16, lr 1e-3"),
}
EXTRA = {name: (overrides, 200) for name, (overrides, _) in VARIANTS.items()}
ESTIMATORS = {"full": "full reverse KL", "sampled": "sampled-token estimator"}
SWEEP = (4, 8)  # × the toy's sequences a step (64: 256 and 512), beside compute_matched's own runs at 1×
LABELS = {"on_policy_full": "full reverse KL (reference)", "on_policy_sampled": "sampled-token estimator",
          **{name: label for name, (_, label) in VARIANTS.items()}}
SHARE = 0.9  # "learns": final accuracy at least this share of the full reverse KL's
CONFIRM = 1  # the variants best on the first seed that also run the other seeds
GRADIENT_BATCHES = {"full": 24, "tiny": 3}  # batches of the toy's sequences a step for gradient_study
EXCLUDED = 3.0  # k = log p_S(x) − log p_T(x) above this: a token the teacher rules out (p_T < e⁻³·p_S)


def trainer_gradient(models: Models, plan: Plan, records: list[dict], seed: int
                     ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """One micro-batch through the trainer's own step (`objective_step`: its rollout, teacher, loss and backward)
    at the student's current weights, its draws seeded by `seed`: the gradient [P], the step's metrics and the
    response tokens [B, T] it was computed on."""
    seen: dict[str, torch.Tensor] = {}

    def loss(student: Scores, teacher: Any, actions: torch.Tensor, responses: Rollout) -> tuple[torch.Tensor, dict]:
        seen["tokens"] = responses.tokens
        return plan.loss(student, teacher, actions, responses)

    models.student.zero_grad(set_to_none=True)
    generator = torch.Generator(models.device).manual_seed(seed)
    metrics = objective_step(models, records, replace(plan, loss=loss), generator, Timer(),
                             lambda value: value.backward())
    params = [p for p in models.student.parameters() if p.requires_grad]
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])  # [P]
    return grad, metrics, seen["tokens"]


def excluded_part(plan: Plan, temperature: float) -> Plan:
    """The plan with the plain sampled estimator's loss kept to the tokens the teacher rules out (k = log p_S(x) −
    log p_T(x) > EXCLUDED), at the whole batch's normaliser: with the other tokens' part it sums to the whole
    loss, so its gradient is those tokens' part of the estimator's. Logs their share of the tokens."""
    def loss(student: Scores, teacher: Any, actions: torch.Tensor, responses: Rollout) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            k = student.logprobs(actions, temperature) - teacher.values  # [B, T]
        kept = responses.mask * (k > EXCLUDED)  # [B, T]
        share = kept.sum() / responses.mask.sum().clamp(min=1)
        value, metrics = plan.loss(student, teacher, actions, replace(responses, mask=kept))
        return value * share, {**metrics, "excluded_share": share.item()}
    return replace(plan, loss=loss)


def inner_products(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Per-batch vectors a, b [N, P]: the mean over i of ⟨a_i, b_i⟩ and the mean over i ≠ j of ⟨a_i, b_j⟩
    (independent batches: an unbiased estimate of ⟨E a, E b⟩)."""
    gram = a.double() @ b.double().T  # [N, N]
    n = gram.shape[0]
    same = gram.diagonal().sum()
    return float(same / n), float((gram.sum() - same) / (n * (n - 1)))


def signal_noise(grads: torch.Tensor) -> dict[str, float]:
    """Per-batch gradients [N, P]: the signal |E g|² (mean over i ≠ j of ⟨g_i, g_j⟩), the noise E|g − E g|²
    (mean |g_i|² − the signal) and their ratio."""
    same, other = inner_products(grads, grads)
    return {"signal": other, "noise": same - other, "snr": other / (same - other)}


def gradient_statistics(estimate: torch.Tensor, full: torch.Tensor) -> dict[str, Any]:
    """An estimator's per-batch gradients [N, P] against the full reverse KL's on the same sequences [N, P]: the
    per-batch cosines, the cosine of the sums over the N batches, the regression coefficient
    Σ⟨g_i, g_full,i⟩ / Σ|g_full,i|² with its standard error over the batches (a ratio estimate's), and each one's
    signal and noise."""
    cosine = torch.nn.functional.cosine_similarity
    dots, norms = (estimate.double() * full.double()).sum(1), full.double().square().sum(1)  # [N] each
    regression = dots.sum() / norms.sum()
    return {"cosine": cosine(estimate.double(), full.double(), dim=1).tolist(),
            "cosine_summed": float(cosine(estimate.double().sum(0), full.double().sum(0), dim=0)),
            "regression": float(regression),
            "regression_se": float((dots - regression * norms).std() / (len(norms) ** 0.5 * norms.mean())),
            "estimate": signal_noise(estimate), "full": signal_noise(full)}


def noise_share(part: torch.Tensor, whole: torch.Tensor) -> float:
    """The share of `whole`'s noise that `part` of it carries, Cov(part, whole) / Var(whole) (the parts' shares sum
    to 1), from per-batch vectors [N, P]."""
    same, other = inner_products(part, whole)
    return (same - other) / signal_noise(whole)["noise"]


def same_draws(models: Models, plans: dict[str, Plan], records: list[dict], seed: int
               ) -> dict[str, tuple[torch.Tensor, dict[str, float]]]:
    """Each plan's gradient [P] and metrics on one micro-batch (trainer_gradient), every plan on the same responses:
    the draws are seeded alike, and a plan that sampled others is refused."""
    found, first = {}, None
    for name, plan in plans.items():
        grad, metrics, tokens = trainer_gradient(models, plan, records, seed)
        if first is not None and not torch.equal(first, tokens):
            raise RuntimeError(f"{name} sampled other responses than {next(iter(plans))} from the same seed {seed}: "
                               "the comparison needs the same draws")
        first = tokens
        found[name] = (grad, metrics)
    return found


def gradient_study(task: dict[str, Any], size: str) -> dict[str, Any]:
    """At the student start, on GRADIENT_BATCHES batches (the records of seed 0's first steps, their draws seeded
    by the batch): every sampled variant's gradient against the full reverse KL's on the same sequences
    (gradient_statistics), the mean k against the exact KL, and the teacher-excluded tokens' share of the plain
    estimator's tokens, noise and signal. LoRA's gradient lives in other parameters and is left out."""
    base = base_overrides(task, size)
    full_kl = {"objective.kind": "on_policy", "objective.estimator": "full"}
    session = Session(load_config(None, {**base, **full_kl}))
    models, records = session.models(), session.train_data.records
    models.student.train()
    variants = {"on_policy_sampled": SAMPLED,
                **{n: o for n, (o, _) in VARIANTS.items() if "student.trainable" not in o}}
    configs = {name: load_config(None, {**base, **o}) for name, o in variants.items()}
    layout_of = {name: (c.train.batch_size, c.rollout.samples_per_prompt) for name, c in configs.items()}
    layouts: dict[tuple[int, int], dict[str, Plan]] = {}  # (prompts, samples a prompt) -> the plans sampling so
    for name, layout in layout_of.items():
        layouts.setdefault(layout, {"full": Plan.of(load_config(None, {
            **base, **full_kl, "train.batch_size": layout[0], "rollout.samples_per_prompt": layout[1]}))})
        layouts[layout][name] = Plan.of(configs[name])
    plain = layout_of["on_policy_sampled"]
    layouts[plain]["excluded"] = excluded_part(layouts[plain]["on_policy_sampled"],
                                               configs["on_policy_sampled"].objective.temperature)
    grads = {layout: {name: [] for name in plans} for layout, plans in layouts.items()}
    metrics = {layout: {name: [] for name in plans} for layout, plans in layouts.items()}
    for batch in range(GRADIENT_BATCHES[size]):
        for layout, plans in layouts.items():
            chosen = [records[i] for i in step_indices(len(records), batch, layout[0], 0)]
            for name, (grad, values) in same_draws(models, plans, chosen, batch).items():
                grads[layout][name].append(grad)
                metrics[layout][name].append(values)
    g = {layout: {name: torch.stack(values) for name, values in by_name.items()}  # [N, P] each
         for layout, by_name in grads.items()}
    full, sampled, excluded = g[plain]["full"], g[plain]["on_policy_sampled"], g[plain]["excluded"]
    between = torch.nn.functional.cosine_similarity(full[:, None].double(), full[None].double(), dim=2)  # [N, N]
    n = full.shape[0]
    def mean(name: str, key: str) -> float:
        return float(np.mean([m[key] for m in metrics[plain][name]]))

    return {"batches": n, "sequences": plain[0],
            "estimators": {name: gradient_statistics(g[layout][name], g[layout]["full"])
                           for name, layout in layout_of.items()},
            "full_between_batches": float((between.sum() - between.diagonal().sum()) / (n * (n - 1))),
            "mean_k": mean("on_policy_sampled", "divergence"), "exact_kl": mean("full", "divergence"),
            "excluded_threshold": EXCLUDED, "excluded_token_share": mean("excluded", "excluded_share"),
            "excluded_noise_share": noise_share(excluded, sampled),
            "excluded_signal_share": inner_products(excluded, sampled)[1] / signal_noise(sampled)["signal"]}


def sweep_runs(size: str) -> dict[str, tuple[dict[str, Any], int]]:
    """The sequences-per-step runs beside compute_matched's own: each estimator at SWEEP × the size's batch, as
    many steps as those."""
    batch = SIZES[size]["batch_size"]
    return {f"on_policy_{estimator}_x{times}": ({"objective.kind": "on_policy", "objective.estimator": estimator,
                                                "train.batch_size": times * batch}, 200)
            for times in SWEEP for estimator in ESTIMATORS}


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Screen every remedy on the first seed, run the full KL, the plain estimator and the CONFIRM best remedy on
    the other seeds, then the sequences-per-step sweep on every seed and the gradient study; write
    results_sampled_estimator.png, .json and .md."""
    seeds = SIZES[size]["seeds"]
    references = ["on_policy_full", "on_policy_sampled"]
    task, curves = method_runs(out, size, [*references, *EXTRA], EXTRA, seeds[:1])
    best = sorted(EXTRA, key=lambda n: -curves[n][0]["accuracy"][-1])[:CONFIRM]
    if len(seeds) > 1:
        _, more = method_runs(out, size, [*references, *best], EXTRA, seeds[1:])
        for name, cs in more.items():
            curves[name].extend(cs)
    extra = sweep_runs(size)
    _, swept = method_runs(out, size, list(extra), extra)
    full = float(np.mean([c["accuracy"][-1] for c in curves["on_policy_full"]]))
    before = curves["on_policy_full"][0]["student_before"]
    rows = {name: summary_row(cs, full) for name, cs in curves.items()}
    winners = [n for n, r in rows.items() if n != "on_policy_full" and np.mean(r["share_of_full"]) >= SHARE]
    batch = SIZES[size]["batch_size"]
    sweep = {estimator: {str(times * batch): summary_row(curves[f"on_policy_{estimator}"] if times == 1 else
                                                         swept[f"on_policy_{estimator}_x{times}"], full)
                         for times in (1, *SWEEP)} for estimator in ESTIMATORS}
    sweep_curves = {estimator: {sequences: curves[f"on_policy_{estimator}"] if sequences == str(batch) else
                                swept[f"on_policy_{estimator}_x{int(sequences) // batch}"]
                                for sequences in sweep[estimator]} for estimator in ESTIMATORS}
    result = {"teacher": curves["on_policy_full"][0]["teacher"], "student_before": before, "full_final": full,
              "share": SHARE, "winners": winners, "seeds": len(curves["on_policy_full"]), "confirmed": best,
              "methods": rows, "gradients": gradient_study(task, size), "sweep": sweep, "curves": curves,
              "sweep_curves": sweep_curves}
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / f"results_{NAME}.png")
    save_results(out, NAME, result, table(result), root)
    return result


def summary_row(cs: list[dict[str, Any]], full: float) -> dict[str, list[float]]:
    """Per seed: final and best accuracy, share of the full KL's final, TFLOPs (in all, and at the first eval at
    THRESHOLD or above: None where none is), seconds per step and steps."""
    return {"accuracy_final": [c["accuracy"][-1] for c in cs], "accuracy_best": [max(c["accuracy"]) for c in cs],
            "share_of_full": [c["accuracy"][-1] / max(full, 1e-9) for c in cs],
            "tflops_total": [c["flops"][-1] / 1e12 for c in cs],
            "tflops_to_threshold": [None if (x := first_reach(c, "flops", THRESHOLD)) is None else x / 1e12
                                    for c in cs],
            "seconds_per_step": [c["seconds_per_step"] for c in cs],
            "steps": [c["steps"][-1] for c in cs]}


def table(result: dict[str, Any]) -> str:
    """Markdown: the remedies (final and best accuracy, share of the full KL's final, compute, seconds per step),
    the gradient study, then the sequences-per-step sweep."""
    lines = ["| variant | seeds | final accuracy | best eval accuracy | share of full KL's final | TFLOPs | s/step |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        lines.append(f"| {LABELS[name]} | {len(r['accuracy_final'])} | {mean_std(r['accuracy_final'])} | "
                     f"{mean_std(r['accuracy_best'])} | "
                     f"{mean_std(r['share_of_full'], '.2f')} | {np.mean(r['tflops_total']):.3g} | "
                     f"{np.mean(r['seconds_per_step']):.3f} |")
    found = ", ".join(LABELS[n] for n in result["winners"]) or "none"
    lines.append(f"\nTeacher {result['teacher']:.3f}, student start {result['student_before']:.3f} (greedy exact "
                 f"match); mean ± std over the seeds shown: every variant ran the first seed; the "
                 f"{len(result['confirmed'])} best on it, the plain estimator and the full KL {result['seeds']}. "
                 f"Variants reaching {result['share']:.0%} of the full reverse KL's final accuracy "
                 f"({result['full_final']:.3f}): {found}.")
    lines.append(gradient_table(result["gradients"]))
    lines.append(sweep_table(result["sweep"], result["teacher"]))
    return "\n".join(lines) + "\n"


def gradient_table(g: dict[str, Any]) -> str:
    """Markdown: each estimator's gradient at the student start against the full KL's, and its signal and noise."""
    n, sequences = g["batches"], g["sequences"]
    lines = [f"\nAt the student start, through the trainer's own step, {n} batches of {sequences} sequences; each "
             "estimator against the full reverse KL's gradient on the same sequences (the full KL's own row: on the "
             f"batches of {sequences} prompts × 1 sample):\n",
             f"| estimator | per-batch cosine with the full KL's | cosine of the sums over {n} batches | "
             "⟨g, g_full⟩ / \\|g_full\\|² ± s.e. | signal \\|E g\\|² | noise E\\|g − E g\\|² | signal / noise |",
             "|---|---|---|---|---|---|---|"]
    full = g["estimators"]["on_policy_sampled"]["full"]
    lines.append(f"| full reverse KL | 1 | 1 | 1 | {full['signal']:.3g} | {full['noise']:.3g} | {full['snr']:.3f} |")
    for name, e in g["estimators"].items():
        lines.append(f"| {LABELS[name]} | {mean_std(e['cosine'])} | {e['cosine_summed']:.3f} | "
                     f"{e['regression']:.3f} ± {e['regression_se']:.3f} | "
                     f"{e['estimate']['signal']:.3g} | {e['estimate']['noise']:.3g} | {e['estimate']['snr']:.3f} |")
    plain = g["estimators"]["on_policy_sampled"]["estimate"]
    lines.append(f"\nMean k over the sampled tokens {g['mean_k']:.3f} nats, the exact per-token reverse KL on the same "
                 f"sequences {g['exact_kl']:.3f}. The plain estimator's noise is {plain['noise'] / full['noise']:.1f}× "
                 f"the full KL's. Tokens the teacher rules out (k > {g['excluded_threshold']:g}) are "
                 f"{g['excluded_token_share']:.1%} of the sampled tokens and carry {g['excluded_noise_share']:.0%} of "
                 f"the plain estimator's noise (Cov(their part, g) / Var(g)) and {g['excluded_signal_share']:.0%} of "
                 f"its signal (⟨E their part, E g⟩ / \\|E g\\|²). The full KL's gradients on two different batches "
                 f"have a mean cosine of {g['full_between_batches']:.3f}.")
    return "\n".join(lines)


def sweep_table(sweep: dict[str, Any], teacher: float) -> str:
    """Markdown: final and best accuracy per estimator and sequences per step, with compute and step time."""
    lines = ["\nSequences per step (one sample a prompt, the same lr and schedule):\n",
             "| sequences per step | estimator | seeds | steps | final accuracy | best eval accuracy | TFLOPs | "
             f"TFLOPs to {THRESHOLD:g} | s/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for sequences in next(iter(sweep.values())):
        for estimator, label in ESTIMATORS.items():
            r = sweep[estimator][sequences]
            lines.append(f"| {sequences} | {label} | {len(r['accuracy_final'])} | {r['steps'][0]} | "
                         f"{mean_std(r['accuracy_final'])} | {mean_std(r['accuracy_best'])} | "
                         f"{np.mean(r['tflops_total']):.3g} | {reached(r['tflops_to_threshold'])} | "
                         f"{np.mean(r['seconds_per_step']):.3f} |")
    lines.append(f"\nTeacher {teacher:.3f}; mean ± std over the seeds shown; TFLOPs to {THRESHOLD:g}: at the first "
                 "eval at or above it (every 25 steps), within a run whose lr schedule spans its 200 steps; s/step "
                 "measured on one shared CPU thread.")
    return "\n".join(lines)


def reached(values: list[float | None]) -> str:
    """'0.42 ± 0.03' over the seeds that reached the threshold, with how many did where not all; 'not reached'."""
    hits = [v for v in values if v is not None]
    if not hits:
        return "not reached"
    return mean_std(hits, ".2f") + ("" if len(hits) == len(values) else f" ({len(hits)} of {len(values)} seeds)")


def plot(result: dict[str, Any], path: Path) -> None:
    """Left: the remedies' accuracy against estimated FLOPs. Middle: the sweep's final accuracy against sequences
    per step. Right: the sweep's accuracy against FLOPs. Mean ± std bands over seeds."""
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    ax = axes[0]
    for name, cs in result["curves"].items():
        grid, mean, std = band(cs, "flops")
        line, = ax.plot(grid / 1e12, mean, label=LABELS[name], linestyle="--" if name == "on_policy_full" else "-")
        ax.fill_between(grid / 1e12, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.axhline(result["share"] * result["full_final"], color="grey", linestyle=":",
               label=f"{result['share']:.0%} of the full KL's final")
    ax.set_title("Remedies at the full KL's budget (64 sequences a step)")
    ax.set_xlabel("training compute (TFLOPs, estimated)")
    for i, (estimator, label) in enumerate(ESTIMATORS.items()):
        rows = result["sweep"][estimator]
        sequences = [int(s) for s in rows]
        finals = np.array([rows[s]["accuracy_final"] for s in rows], dtype=object)
        axes[1].errorbar(sequences, [np.mean(f) for f in finals], yerr=[np.std(f) for f in finals], marker="o",
                         capsize=3, color=f"C{i}", label=label)
        for j, (sequences_, cs) in enumerate(result["sweep_curves"][estimator].items()):
            grid, mean, std = band(cs, "flops")
            grid, mean, std = grid[1:], mean[1:], std[1:]  # a log axis: from the first step on
            axes[2].plot(grid / 1e12, mean, color=f"C{i}", linestyle=("-", "--", ":")[j % 3],
                         label=f"{label}, {sequences_} a step")
            axes[2].fill_between(grid / 1e12, mean - std, mean + std, color=f"C{i}", alpha=0.15)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks([int(s) for s in result["sweep"]["full"]], [s for s in result["sweep"]["full"]])
    axes[1].set_xlabel("sequences per step (200 steps each)")
    axes[1].set_title("Final accuracy against sequences per step")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("training compute (TFLOPs, estimated, log)")
    axes[2].set_title("Sequences per step: accuracy against compute")
    for ax in axes:
        ax.axhline(result["teacher"], color="black", linestyle="--", label="teacher")
        ax.set_ylabel("eval accuracy (exact match, greedy)")
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Sampled-token estimator, text toy; mean ± std over seeds (up to {result['seeds']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
