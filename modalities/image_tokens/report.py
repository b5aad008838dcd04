"""The end-of-run picture report: every model's accuracy and FID, the held-out student–teacher divergence,
sampling speed (pictures/s of the guided teacher against the student) and `samples.png`, a grid with
three rows per class: teacher with CFG, student before, student after (both without CFG).

The numbers go into summary.json (rewritten) under `pictures`.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from mmopd.engines.hf import rollout
from mmopd.losses import masked_mean, token_divergence
from mmopd.run.report import write_summary
from modalities.image_tokens.llamagen import normalize_prompt

log = logging.getLogger("mmopd")
COLUMNS, SCALE, LABEL_WIDTH = 8, 4, 150


def sampling_speeds(session: Any, models: dict[str, tuple[nn.Module, Any]], records: list[dict],
                    repeats: int = 5) -> dict[str, float]:
    """Pictures per second of each model: the best of `repeats` timed rollouts of every eval prompt in one batch.
    The models take turns within each repeat, so that a spell of load on a shared machine slows all of them
    rather than the one timed then, and their ratio holds."""
    adapter = session.adapter
    prompts = {name: adapter.encode_prompts(records, processor).to(session.device)
               for name, (_, processor) in models.items()}
    sampling, best = adapter.eval_sampling(), dict.fromkeys(models, float("inf"))
    for attempt in range(repeats + 1):  # the first round warms up
        for name, (model, processor) in models.items():
            if session.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            rollout(session.side(model, processor), prompts[name], session.config.rollout.max_new_tokens, sampling,
                    torch.Generator(session.device).manual_seed(attempt))
            if session.device.type == "cuda":
                torch.cuda.synchronize()
            if attempt:
                best[name] = min(best[name], time.perf_counter() - started)
    return {name: len(records) / seconds for name, seconds in best.items()}


@torch.no_grad()
def heldout_divergence(session: Any, student: nn.Module, records: list[dict]) -> float:
    """The training divergence on eval prompts: student samples scored by the (guided) teacher, per token."""
    adapter, config = session.adapter, session.config
    s_prompts = adapter.encode_prompts(records, session.student_processor).to(session.device)
    t_prompts = adapter.encode_prompts(records, session.teacher_processor).to(session.device)
    out = rollout(session.side(student, session.student_processor), s_prompts, config.rollout.max_new_tokens,
                  adapter.eval_sampling(), torch.Generator(session.device).manual_seed(0))
    s_logits = session.space.restrict(adapter.calls.response_logits(student, s_prompts, out.tokens))  # [B, T, A]
    t_logits = session.space.restrict(adapter.calls.response_logits(session.teacher, t_prompts, out.tokens))
    div = token_divergence(s_logits, t_logits, kind=config.objective.divergence, beta=config.objective.beta,
                           temperature=config.objective.temperature)  # [B, T]
    return masked_mean(div, out.mask).item()


def sample_grid(rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """One labelled row of pictures per (label, pictures), each picture scaled up SCALE× (nearest)."""
    side = rows[0][1][0].size[0] * SCALE
    grid = Image.new("RGB", (LABEL_WIDTH + COLUMNS * (side + 2), len(rows) * (side + 2)), "white")
    pen = ImageDraw.Draw(grid)
    for r, (label, pictures) in enumerate(rows):
        y = r * (side + 2)
        pen.text((4, y + side // 2 - 6), label, fill="black")
        for c, picture in enumerate(pictures[:COLUMNS]):
            grid.paste(picture.resize((side, side), Image.NEAREST), (LABEL_WIDTH + c * (side + 2), y))
    return grid


def write_image_report(out_dir: Path, session: Any, summary: dict[str, Any]) -> None:
    if session.eval_data is None or session.teacher is None:
        log.info("image report skipped: it needs data.eval and a teacher")
        return
    config, adapter = session.config, session.adapter
    records = session.eval_data.records[: config.data.eval_limit or None]
    before = adapter.calls.load_model(config.student.path, "student", torch.float32).to(session.device).eval()
    unguided = copy.copy(session.teacher_processor)
    unguided.cfg_scale = 1.0
    models = {"teacher": (session.teacher, session.teacher_processor),
              "teacher_unguided": (session.teacher, unguided),
              "student_before": (before, session.student_processor),
              "student_after": (session.policy, session.student_processor)}
    metrics, pictures = {}, {}
    for name, (model, processor) in models.items():
        result = session.evaluate(model, processor, desc=f"report {name}")
        metrics[name], pictures[name] = result["metrics"], result["responses"]
    timed = ("teacher", "teacher_unguided", "student_after")
    speed = sampling_speeds(session, {name: models[name] for name in timed}, records)
    report = {
        "cfg_scale": config.teacher.cfg_scale,
        "eval_pictures": len(records),
        **{key: {name: m[key] for name, m in metrics.items()} for key in metrics["teacher"]},
        "heldout_reverse_kl" if config.objective.divergence == "reverse_kl" else "heldout_divergence": {
            "student_before": heldout_divergence(session, before, records),
            "student_after": heldout_divergence(session, session.policy, records)},
        "pictures_per_s": speed,
        "student_speedup_over_guided_teacher": speed["student_after"] / speed["teacher"],
        "grid": "samples.png",
    }
    summary["pictures"] = report
    write_summary(out_dir, summary)

    class_names = adapter.judge().class_names
    rows = []
    for label, name in enumerate(class_names):
        picks = [i for i, r in enumerate(records) if r["label"] == label] if records[0]["label"] is not None else \
            [i for i, r in enumerate(records) if normalize_prompt(r["prompt"]) == normalize_prompt(name)]
        if not picks:
            continue
        for role, caption in (("teacher", f"teacher cfg {config.teacher.cfg_scale:g}"),
                              ("student_before", "student before"), ("student_after", "student after")):
            rows.append((f"{name}\n{caption}", [pictures[role][i] for i in picks]))
    sample_grid(rows).save(out_dir / "samples.png")
