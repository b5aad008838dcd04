"""The training loop, top to bottom: load, check, then step, log, evaluate and checkpoint.

Global batch per optimizer step = train.batch_size × train.grad_accum × processes. Which records form
step s, and every random draw inside it, depend only on (seed, s, micro-batch, rank), so a resumed run
repeats the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from tqdm.auto import tqdm

from mmopd.adapter import get_adapter
from mmopd.checkpoint import latest_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from mmopd.compat import IncompatibleModelsError
from mmopd.config import Config, ConfigError, save_config
from mmopd.data import DataError, Dataset, load_jsonl, step_indices
from mmopd.evaluation import evaluate_policy
from mmopd.lora import load_lora_weights
from mmopd.objectives import Models, Timer, needs_answers, needs_teacher, objective_step
from mmopd.report import MetricsLog, format_table, plot_metrics, write_summary

log = logging.getLogger("mmopd")


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (repeated non-finite losses); the last good checkpoint is intact."""


def resolve_dtype(name: str, device: torch.device, role: str) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it and fp32 otherwise; explicit choices are checked."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    dtype = getattr(torch, name)
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError(f"{role}.dtype=float16 is not supported on CPU; use float32 or bfloat16")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{role}.dtype=bfloat16 is not supported on this GPU; use float16 or float32")
    return dtype


class Session:
    """Everything a run needs, loaded and checked: data, models, processors, the action space."""

    def __init__(self, config: Config, for_eval: bool = False, student_override: str | Path | None = None,
                 need_teacher: bool | None = None, accelerator: Accelerator | None = None):
        self.config = config
        self.adapter = get_adapter(config.modality)
        self.adapter.configure(config)
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        c = config
        skip = c.data.skip_bad
        self.train_data = None if for_eval else load_jsonl(c.data.train, self.adapter.check_record, skip, "data.train")
        if c.data.eval:
            self.eval_data = load_jsonl(c.data.eval, self.adapter.check_record, skip, "data.eval")
        elif for_eval:
            raise ConfigError("data.eval is required to evaluate: a JSONL file of eval records")
        else:
            self.eval_data = None
        if self.train_data is not None and needs_answers(c):
            missing = next((r for r in self.train_data.records if not r.get("answer")), None)
            if missing is not None:
                raise DataError(f"{missing['_where']}: objective {c.objective.kind}"
                                f"{' with sft_weight' if c.objective.sft_weight else ''} needs an 'answer' in every record")

        self.student_processor = self.adapter.load_processor(c.student.path, "student")
        student_path = str(student_override) if student_override else c.student.path
        s_dtype = resolve_dtype(c.student.dtype, self.device, "student")
        if c.student.dtype == "auto" and not for_eval:
            s_dtype = torch.float32  # fp32 master weights; accelerate autocasts to bf16 where supported
        self.policy = self.adapter.load_model(student_path, "student", s_dtype).to(self.device)
        want_teacher = needs_teacher(c) if need_teacher is None else need_teacher
        self.teacher, self.teacher_processor = None, None
        if want_teacher and c.teacher.cfg_scale != 1.0 and not self.adapter.supports_cfg:
            raise IncompatibleModelsError(
                f"teacher.cfg_scale={c.teacher.cfg_scale} asks for classifier-free guidance, but {c.modality} "
                "models have no unconditional branch; set teacher.cfg_scale=1.0")
        if want_teacher:
            self.teacher_processor = self.adapter.load_processor(c.teacher.path, "teacher")
            t_dtype = resolve_dtype(c.teacher.dtype, self.device, "teacher")
            self.teacher = self.adapter.load_model(c.teacher.path, "teacher", t_dtype).to(self.device)
            self.teacher.eval().requires_grad_(False)
            self.adapter.check_pair(self.student_processor, self.teacher_processor, self.policy, self.teacher)
        for data in (self.train_data, self.eval_data):
            if data is not None:
                self._drop_overlong(data)
        self.space = self.adapter.token_space(self.student_processor, self.policy)
        self.eos_ids = self.adapter.eos_token_ids(self.student_processor)
        self.pad_id = self.student_processor.pad_token_id if getattr(self.student_processor, "pad_token_id", None) \
            is not None else self.eos_ids[0]

    def _drop_overlong(self, data: Dataset) -> None:
        """Refuse (or with data.skip_bad, skip and count) prompts that leave no room for the response."""
        lengths = self.adapter.prompt_lengths(data.records, self.student_processor)
        limits = [context_length(m) for m in (self.policy, self.teacher) if m is not None]
        limits = [n for n in limits if n is not None]
        if lengths is None or not limits:
            return
        limit = min(limits)
        budget = limit - self.config.rollout.max_new_tokens
        keep = []
        for record, n in zip(data.records, lengths):
            if n <= budget:
                keep.append(record)
                continue
            message = (f"{record['_where']}: the prompt is {n} tokens, and with rollout.max_new_tokens="
                       f"{self.config.rollout.max_new_tokens} it exceeds the models' context of {limit} tokens")
            if not self.config.data.skip_bad:
                raise DataError(message + "; shorten it, lower rollout.max_new_tokens or set data.skip_bad=true")
            log.warning("skipping %s", message)
            data.skipped += 1
        if not keep:
            raise DataError(f"{data.path} holds no prompt short enough for the models' context of {limit} tokens")
        data.records = keep

    def models(self, student: torch.nn.Module | None = None) -> Models:
        """What objective_step needs; `student` is the (possibly DDP-wrapped) model being trained."""
        return Models(self.adapter, student if student is not None else self.policy, self.policy,
                      self.student_processor, self.teacher, self.teacher_processor, self.space, self.eos_ids,
                      self.pad_id, self.device)

    def evaluate(self, model: torch.nn.Module, processor: Any, desc: str = "eval",
                 progress: bool = False) -> dict[str, Any]:
        records = self.eval_data.records
        if self.config.data.eval_limit:
            records = records[: self.config.data.eval_limit]
        return evaluate_policy(self.adapter, model, processor, records, self.space, self.eos_ids, self.pad_id,
                               self.config.rollout.max_new_tokens, self.config.train.eval_batch_size, self.device,
                               desc=desc, progress=progress)


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's positions cover (its text config's max_position_embeddings)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in sorted(keys)}


SUPPORTED_DISTRIBUTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def check_distributed(accelerator: Accelerator) -> None:
    """Refuse sharded training (FSDP, DeepSpeed, ...) before anything loads: it would hang, not fail."""
    kind = accelerator.distributed_type
    if kind not in SUPPORTED_DISTRIBUTED:
        raise ConfigError(f"accelerate is set up for {kind.value}, which mmopd does not support yet: sharded "
                          "models need rollouts that keep every rank decoding until all ranks finish, evaluation "
                          "on every rank and a gathered state dict at save. Use data parallelism (accelerate "
                          "launch --multi_gpu, configs/accelerate/ddp_cpu_2proc.yaml), with "
                          "student.trainable=lora and student.gradient_checkpointing=true for large students")


def train(config: Config) -> dict[str, Any]:
    """Run distillation as configured; return the summary (also written to out_dir/summary.json)."""
    c = config
    t = c.train
    cuda = torch.cuda.is_available()
    mixed = "bf16" if cuda and torch.cuda.is_bf16_supported() and c.student.dtype == "auto" else "no"
    out = Path(t.out_dir)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=mixed, log_with=t.report_to or None,
                              project_dir=str(out))
    check_distributed(accelerator)
    main = accelerator.is_main_process
    resume_from = latest_checkpoint(out) if t.resume == "auto" else None
    lora_resume = resume_from is not None and c.student.trainable == "lora"  # adapters go on the original student
    session = Session(c, student_override=resume_from / "model" if resume_from and not lora_resume else None,
                      accelerator=accelerator)
    if c.student.gradient_checkpointing:
        session.policy.gradient_checkpointing_enable()
    session.policy = session.adapter.prepare_trainable(session.policy, c.student)
    if lora_resume:
        load_lora_weights(session.policy, resume_from / "lora")
    policy = session.policy
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t.warmup, t.steps))
    # the scheduler stays unprepared: accelerate would step it once per process, but ours counts optimizer steps
    student, optimizer = accelerator.prepare(policy, optimizer)
    models = session.models(student)

    metrics_log = MetricsLog(out / "metrics.jsonl")
    state: dict[str, Any] = {"step": 0, "baseline": {}, "skipped_steps": 0}
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if main:
            metrics_log.truncate_after(state["step"])
            log.info("resumed from %s at step %d", resume_from, state["step"])
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_log.path.unlink(missing_ok=True)
    if main:
        save_config(c, out / "config.yaml")
    if t.report_to:
        accelerator.init_trackers("mmopd", config=c.to_dict())

    metric = session.adapter.metric
    evaluating = session.eval_data is not None and main
    if resume_from is None and evaluating:
        if session.teacher is not None:
            state["baseline"]["teacher"] = session.evaluate(session.teacher, session.teacher_processor,
                                                            "eval teacher", t.progress)["metrics"][metric]
        state["baseline"]["student_before"] = session.evaluate(policy, session.student_processor,
                                                               "eval student", t.progress)["metrics"][metric]
        metrics_log.write({"step": 0, f"eval/{metric}": state["baseline"]["student_before"]})

    # every rank listens (a scheduler's SIGTERM reaches them all); they agree on the stop step through the
    # per-step metrics reduce, so all of them finish that step, wait for the checkpoint and exit together
    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum)) \
        if _in_main_thread() else None

    def checkpoint(step: int) -> None:
        if main:
            payload = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "rng": rng_state(), "baseline": state["baseline"], "skipped_steps": state["skipped_steps"]}
            save_checkpoint(out, step, accelerator.unwrap_model(student), session.student_processor, payload,
                            t.keep_last)
        accelerator.wait_for_everyone()

    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = t.batch_size * t.grad_accum * world
    records = session.train_data.records
    bar = tqdm(total=t.steps, initial=state["step"], desc="distil", disable=not (main and t.progress))
    bad_in_row, stopping = 0, False
    student.train()
    for step in range(state["step"], t.steps):
        timer = Timer()
        started = time.perf_counter()
        batch = step_indices(len(records), step, per_step, t.seed)
        rows = []
        for micro in range(t.grad_accum):
            slot = micro * world + rank  # this micro-batch's place in the global batch
            micro_records = [records[i] for i in batch[slot * t.batch_size:(slot + 1) * t.batch_size]]
            # seeded by global slot, so 2 processes × 1 micro-batch sample exactly what 1 × 2 does
            generator = torch.Generator(session.device).manual_seed((t.seed * 1_000_003 + step) * 1_009 + slot)
            sync = micro == t.grad_accum - 1
            with accelerator.no_sync(student) if not sync else nullcontext():
                rows.append(objective_step(models, micro_records, c, generator, timer,
                                           lambda loss: accelerator.backward(loss / t.grad_accum)))
        row = _mean_rows(rows)
        stopping = stop["signal"] is not None
        if world > 1:  # every process logs the global mean, not its own share; any rank's SIGTERM stops all
            values = accelerator.reduce(torch.tensor([*row.values(), float(stopping)], device=session.device),
                                        "mean").tolist()
            row, stopping = dict(zip(row, values[:-1])), values[-1] > 0
        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm > 0 else \
            torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
        finite = math.isfinite(row["loss"]) and math.isfinite(float(grad_norm))
        if finite:
            optimizer.step()
            bad_in_row = 0
        else:
            state["skipped_steps"] += 1
            bad_in_row += 1
            log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); skipped the update",
                        step + 1, row["loss"], float(grad_norm))
            if bad_in_row >= 5:
                raise TrainingAborted(f"{bad_in_row} non-finite steps in a row at step {step + 1}; stopping. "
                                      f"The last good checkpoint in {out / 'checkpoints'} is intact; lower "
                                      "train.lr or check the data")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        tokens = row["response_tokens"] * t.grad_accum * world
        row.update(step=step + 1, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                   tokens_per_s=tokens / elapsed, skipped_steps=state["skipped_steps"],
                   **{f"time/{k}": v for k, v in timer.seconds.items()}, **{"time/step": elapsed})
        row.setdefault("divergence", None)
        if main and (step + 1) % t.log_every == 0:
            metrics_log.write(row)
            if t.report_to:
                accelerator.log({k: v for k, v in row.items() if isinstance(v, float)}, step=step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", div=f"{row['divergence'] or 0:.3f}",
                        tok_s=f"{row['tokens_per_s']:.0f}")
        done = step + 1
        if evaluating and t.eval_every and done % t.eval_every == 0 and done < t.steps:
            score = session.evaluate(policy, session.student_processor)["metrics"][metric]
            metrics_log.write({"step": done, f"eval/{metric}": score})
        if (t.save_every and done % t.save_every == 0) or done == t.steps or stopping:
            state["step"] = done
            checkpoint(done)
        if stopping:
            log.warning("SIGTERM: saved checkpoint step-%d and stopped", done)
            break
    bar.close()
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    accelerator.end_training()

    summary: dict[str, Any] = {"metric": metric, **state["baseline"], "steps": state["step"]}
    if stopping:
        summary["stopped_by"] = "SIGTERM"
        return summary
    if evaluating:
        final = session.evaluate(policy, session.student_processor, "eval student", t.progress)
        summary["student_after"] = final["metrics"][metric]
        metrics_log.write({"step": t.steps, f"eval/{metric}": summary["student_after"]})
        summary["samples"] = [{"prompt": r.get("prompt"), "response": resp, "answer": r.get("answer")}
                              for r, resp in zip(session.eval_data.records[:8], final["responses"][:8])
                              if isinstance(resp, str)]
        teacher, before = summary.get("teacher"), summary.get("student_before")
        if teacher is not None and before is not None and teacher > before:
            summary["gap_closed"] = (summary["student_after"] - before) / (teacher - before)
    summary.update(objective=c.objective.kind, skipped_records=session.train_data.skipped,
                   skipped_steps=state["skipped_steps"], out_dir=str(out))
    if main:
        write_summary(out, summary)
        plot_metrics(out, metric, summary.get("teacher"))
        session.adapter.write_report(out, session, summary)
        print(format_table(summary))
    return summary


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
