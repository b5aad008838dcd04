"""The training loop, top to bottom: load, check, then step, log, evaluate and checkpoint.

Global batch per optimizer step = train.batch_size × train.grad_accum × processes. Which records form
step s, and every random draw inside it, depend only on (seed, s, micro-batch, rank), so a resumed run
repeats the uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import signal
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator, DistributedType
from tqdm.auto import tqdm

from mmopd.adapter import prepare_trainable
from mmopd.checkpoint import rng_state, save_checkpoint, save_sharded_checkpoint, set_rng_state
from mmopd.config import Config, ConfigError, save_config
from mmopd.health import HealthMonitor
from mmopd.lora import load_lora_weights
from mmopd.objectives import Timer, check_engine, objective_step
from mmopd.report import MetricsLog, format_table, plot_metrics, read_metrics, teacher_divergences, write_summary
from mmopd.rundir import Run, apply_resume_changes, open_run, record_segment
from mmopd.schedule import warmup_cosine
from mmopd.session import Session
from mmopd.sharding import (clip_grad_norm, decoder_layers, gradient_sync, is_sharded, load_full_optimizer,
                            load_optimizer, parameter_bytes, reshard, shard)
from mmopd.step_order import STEP_ORDER, step_indices
from mmopd.toys import write_report

log = logging.getLogger("mmopd")


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (repeated non-finite losses); the last good checkpoint is intact."""


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in sorted(keys)}


SUPPORTED_DISTRIBUTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def check_distributed(accelerator: Accelerator, config: Config) -> None:
    """Refuse accelerate's own sharding plugins (FSDP, DeepSpeed), and mmopd's sharding on one process, before
    anything loads."""
    kind = accelerator.distributed_type
    if kind not in SUPPORTED_DISTRIBUTED:
        raise ConfigError(f"accelerate is set up for {kind.value}, which mmopd does not use: launch plain processes "
                          "(accelerate launch --multi_gpu, or configs/accelerate/ddp_cpu_2proc.yaml) and set "
                          "train.sharding=fsdp (and teacher.sharding=fsdp) to shard the models with PyTorch FSDP2")
    if config.train.fsdp_cpu_offload and accelerator.device.type != "cuda":
        raise ConfigError("train.fsdp_cpu_offload keeps a sharded GPU student's weights, gradients and optimizer "
                          "state in CPU memory; this run is on the CPU, where they are already: clear it")
    sharded = [f"{name}=fsdp" for name, value in (("train.sharding", config.train.sharding),
                                                  ("teacher.sharding", config.teacher.sharding)) if value == "fsdp"]
    if config.teachers and accelerator.num_processes > 1:
        raise ConfigError("several teachers train on one process for now (each rank would log other teachers' "
                          "divergences); launch one process, or give one teacher")
    if sharded and accelerator.num_processes < 2:
        raise ConfigError(f"{' and '.join(sharded)} shards over processes, but this is one process; launch several "
                          "(accelerate launch --multi_gpu --num_processes N -m mmopd.cli train ...) or set "
                          "train.sharding=none and teacher.sharding=none")


def check_trackers(report_to: list[str]) -> None:
    """Refuse a `train.report_to` tracker that is not installed (accelerate would drop it silently)."""
    for tracker in report_to:
        packages = ("tensorboard", "tensorboardX") if tracker == "tensorboard" else (tracker,)
        if not any(importlib.util.find_spec(name) for name in packages):
            raise ConfigError(f"train.report_to names {tracker}, which is not installed: pip install {packages[0]}, "
                              f"or remove it from train.report_to")


def train(config: Config) -> dict[str, Any]:
    """Run distillation as configured; return the summary (also written to out_dir/summary.json)."""
    c = config
    t = c.train
    check_trackers(t.report_to)
    cuda = torch.cuda.is_available()
    mixed = "bf16" if cuda and torch.cuda.is_bf16_supported() and c.student.dtype == "auto" else "no"
    accelerator = Accelerator(cpu=not cuda, mixed_precision=mixed, log_with=t.report_to or None,
                              project_dir=t.out_dir)
    check_distributed(accelerator, c)
    run = open_run(c, accelerator.is_main_process)  # before any model loads: lock, clean up, where to start
    # every rank listens (a scheduler's SIGTERM reaches them all); they agree on the stop step through the
    # per-step metrics reduce, so all of them finish that step, wait for the checkpoint and exit together
    stop: dict[str, Any] = {"signal": None}
    restore_signals = _listen_for_stop(stop)
    try:
        if run.finished is not None:
            log.warning("%s already did all %d steps; nothing to train (raise train.steps to continue)",
                        run.out, t.steps)
            return run.finished
        summary = _train(c, accelerator, run, stop)
        accelerator.end_training()  # after the final evaluation, which a sharded model runs on every rank
        return summary
    finally:
        restore_signals()
        run.close()


def _train(c: Config, accelerator: Accelerator, run: Run, stop: dict[str, Any]) -> dict[str, Any]:
    t = c.train
    out = run.out
    main = accelerator.is_main_process
    resume_from = run.resume_from
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = t.batch_size * t.grad_accum * world
    if resume_from is not None:
        check_global_batch(run.state.get("global_batch"), per_step, world, t.batch_size, t.grad_accum, resume_from)
    live = t.progress and sys.stderr.isatty()  # off a terminal, plain log lines instead of a redrawn bar
    lora_resume = resume_from is not None and c.student.trainable == "lora"  # adapters go on the original student
    session = Session(c, student_override=resume_from / "model" if resume_from and not lora_resume else None,
                      accelerator=accelerator)
    if c.student.gradient_checkpointing:
        session.policy.gradient_checkpointing_enable()
        layers = decoder_layers(session.policy)
        log.info("student: activation checkpointing in %d of its %d decoder layers",
                 sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers), len(layers))
    # what prepare_trainable initialises (LoRA's A) follows train.seed: the same on every rank, as sharding needs
    # (each rank keeps its own slice of it), and in every run
    torch.manual_seed(t.seed)
    session.policy = prepare_trainable(session.adapter, session.policy, c.student)
    if lora_resume:
        load_lora_weights(session.policy, resume_from / "lora")
    sharded = t.sharding == "fsdp"
    _shard_models(session, c)
    policy = session.policy
    params = [p for p in policy.parameters() if p.requires_grad]
    adamw = optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)  # sharded params: sharded state
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.warmup, t.steps))
    # the scheduler stays unprepared: accelerate would step it once per process, but ours counts optimizer steps
    # a sharded student is not wrapped in DDP: FSDP2 reduces its gradients itself
    student, optimizer = (policy, optimizer) if sharded else accelerator.prepare(policy, optimizer)
    models = session.models(student)

    metrics_log = MetricsLog(out / "metrics.jsonl")
    state: dict[str, Any] = {"step": 0, "baseline": {}, "skipped_steps": 0}
    if resume_from is not None:
        state = run.state
        _resume_optimizer(policy, adamw, resume_from, state)
        scheduler.load_state_dict(state["scheduler"])
        apply_resume_changes(run, optimizer, scheduler, c)
        set_rng_state(state["rng"])
        if main:
            metrics_log.truncate_after(state["step"])
            log.info("resumed from %s at step %d", resume_from, state["step"])
    elif main:
        metrics_log.path.unlink(missing_ok=True)  # a restart of the same config from step 0 (open_run checked)
    if main:
        save_config(c, out / "config.yaml")  # what this segment runs; segments.jsonl keeps the earlier ones
        record_segment(run, c)
    if t.report_to:
        accelerator.init_trackers("mmopd", config=c.to_dict())

    metric = session.adapter.metric
    # a sharded model's forwards need every rank, so every rank evaluates (the same records; main logs them)
    evaluating = session.eval_data is not None and (main or is_sharded(policy) or is_sharded(session.teacher))
    if resume_from is None and evaluating:
        if session.teacher is not None and not session.teacher_in_process:
            log.info("teacher.engine=vllm: the teacher's eval baseline is not measured (its weights are in its "
                     "engine, not in this process); `mmopd eval CONFIG --teacher` loads and measures it")
        elif session.teacher is not None and not session.teachers:  # several: no one teacher answers every prompt
            state["baseline"]["teacher"] = session.evaluate(session.teacher, session.teacher_processor,
                                                            "eval teacher", live)["metrics"][metric]
        state["baseline"]["student_before"] = session.evaluate(policy, session.student_processor,
                                                               "eval student", live)["metrics"][metric]
        kl = session.eval_kl(policy)
        if kl is not None:
            state["baseline"]["kl_before"] = kl
        reshard(session.teacher)
        if main:
            metrics_log.write({"step": 0, f"eval/{metric}": state["baseline"]["student_before"], **eval_kl_row(kl)})

    def checkpoint(step: int) -> None:
        payload = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), "baseline": state["baseline"],
                   "skipped_steps": state["skipped_steps"], "config": c.to_dict(), "run_id": run.run_id,
                   "global_batch": per_step, "step_order": STEP_ORDER}
        if sharded:  # every rank gathers the weights and writes its optimizer shards
            save_sharded_checkpoint(out, step, policy, optimizer, session.student_processor, payload, t.keep_last,
                                    run.run_id, main)
        elif main:
            save_checkpoint(out, step, accelerator.unwrap_model(student), session.student_processor,
                            {**payload, "optimizer": optimizer.state_dict()}, t.keep_last, run.run_id)
        accelerator.wait_for_everyone()

    def sync_engine() -> None:
        models.rollout.sync(policy)
        if not models.rollout.exact and accelerator.num_processes > 1:
            accelerator.wait_for_everyone()  # a shared engine has the new weights before any rank samples

    if not models.rollout.exact:
        sync_engine()  # the engine loaded the student's path; a resumed or LoRA student differs from it
        check_engine(models, session.train_data.records[:4], c)

    records = session.train_data.records
    health = HealthMonitor(t.health_min_entropy, t.health_max_repeat, t.health_max_length, bool(session.eos_ids))
    bar = tqdm(total=t.steps, initial=state["step"], desc="distil", disable=not (main and live))
    plain_every = max(1, t.steps // 20) if main and t.progress and not live else 0
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
            with _accumulating(student, accelerator, sync):
                rows.append(objective_step(models, micro_records, c, generator, timer,
                                           lambda loss: _backward(loss / t.grad_accum, student, accelerator)))
            reshard(session.teacher)
        row = _mean_rows(rows)
        stopping = stop["signal"] is not None
        stop_name = signal.Signals(stop["signal"] or signal.SIGTERM).name  # a remote rank's stop reads as SIGTERM
        if world > 1:  # every process logs the global mean, not its own share; any rank's SIGTERM stops all
            values = accelerator.reduce(torch.tensor([*row.values(), float(stopping)], device=session.device),
                                        "mean").tolist()
            row, stopping = dict(zip(row, values[:-1])), values[-1] > 0
        if sharded:
            grad_norm = clip_grad_norm(params, t.max_grad_norm)
        else:
            grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm > 0 else \
                torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
        finite = math.isfinite(row["loss"]) and math.isfinite(float(grad_norm))
        if finite:
            optimizer.step()
            with timer.phase("sync"):  # the rollout engine samples from the new weights from here on
                sync_engine()
            bad_in_row = 0
        else:
            state["skipped_steps"] += 1
            bad_in_row += 1
            log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); skipped the update",
                        step + 1, row["loss"], float(grad_norm))
            if bad_in_row >= 5:
                raise TrainingAborted(f"{bad_in_row} non-finite steps in a row at step {step + 1}; stopping. "
                                      f"The last good checkpoint in {out / 'checkpoints'} is intact. To continue "
                                      "from it with a lower learning rate, rerun the same command with "
                                      f"train.lr={t.lr / 10:g} 'train.resume_changes=[train.lr]', or check the data")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        tokens = row["response_tokens"] * t.grad_accum * world
        row.update(step=step + 1, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                   tokens_per_s=tokens / elapsed, skipped_steps=state["skipped_steps"],
                   **{f"time/{k}": v for k, v in timer.seconds.items()}, **{"time/step": elapsed})
        row.setdefault("divergence", None)
        if main:
            health.check(step + 1, row)
        if main and (step + 1) % t.log_every == 0:
            metrics_log.write(row)
            if t.report_to:
                accelerator.log({k: v for k, v in row.items() if isinstance(v, float)}, step=step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", div=f"{row['divergence'] or 0:.3f}",
                        tok_s=f"{row['tokens_per_s']:.0f}")
        if plain_every and ((step + 1) % plain_every == 0 or step + 1 == t.steps):
            log.info("step %d/%d loss %.4f divergence %.4f tokens/s %.0f", step + 1, t.steps, row["loss"],
                     row["divergence"] or 0.0, row["tokens_per_s"])
        done = step + 1
        if evaluating and t.eval_every and done % t.eval_every == 0 and done < t.steps:
            score = session.evaluate(policy, session.student_processor)["metrics"][metric]
            kl = session.eval_kl(policy)
            reshard(session.teacher)
            if main:
                metrics_log.write({"step": done, f"eval/{metric}": score, **eval_kl_row(kl)})
        if (t.save_every and done % t.save_every == 0) or done == t.steps or stopping:
            state["step"] = done
            checkpoint(done)
        if stopping:
            log.warning("%s: saved checkpoint step-%d and stopped; rerun the same command to resume", stop_name,
                        done)
            break
    bar.close()

    summary: dict[str, Any] = {"metric": metric, **state["baseline"], "steps": state["step"],
                               "health_warnings": health.warnings}
    if stopping:
        summary["stopped_by"] = stop_name
        return summary
    if evaluating:
        final = session.evaluate(policy, session.student_processor, "eval student", live)
        summary["student_after"] = final["metrics"][metric]
        kl = session.eval_kl(policy)
        reshard(session.teacher)
        if kl is not None:
            summary["kl_after"] = kl
        if main:
            metrics_log.write({"step": t.steps, f"eval/{metric}": summary["student_after"], **eval_kl_row(kl)})
        summary["samples"] = [{"prompt": r.get("prompt"), "response": resp, "answer": r.get("answer")}
                              for r, resp in zip(session.eval_data.records[:8], final["responses"][:8])
                              if isinstance(resp, str)]
        teacher, before = summary.get("teacher"), summary.get("student_before")
        if teacher is not None and before is not None and teacher > before:
            summary["gap_closed"] = (summary["student_after"] - before) / (teacher - before)
    if session.teachers:
        summary["divergence_by_teacher"] = teacher_divergences(read_metrics(out / "metrics.jsonl"))
    summary.update(objective=c.objective.kind, skipped_records=session.train_data.skipped,
                   skipped_steps=state["skipped_steps"], out_dir=str(out))
    if main:
        write_summary(out, summary)
        plot_metrics(out, metric, summary.get("teacher"))
    if main or is_sharded(policy) or is_sharded(session.teacher):  # sampling sharded models needs every rank
        # (each writes the same report; rank 0's is kept)
        with tempfile.TemporaryDirectory() as scratch:
            write_report(c.modality, out if main else Path(scratch), session, summary)
    if main:
        print(format_table(summary))
    return summary


def eval_kl_row(kl: dict[str, float] | None) -> dict[str, float]:
    """The eval KLs as metrics.jsonl columns: eval/reverse_kl, eval/forward_kl (nothing when not measured)."""
    return {f"eval/{name}": value for name, value in (kl or {}).items()}


def check_global_batch(saved: int | None, per_step: int, world: int, batch_size: int, grad_accum: int,
                       checkpoint: Path) -> None:
    """A resumed run keeps the records per optimizer step (which records form each step follow from it), however
    it lays them out over processes and micro-batches."""
    if saved is None or saved == per_step:
        return
    fit = (f"on {world} processes, set train.batch_size × train.grad_accum to {saved // world}" if saved % world == 0
           else f"{saved} does not split over {world} processes; resume on a number of processes that divides it")
    raise ConfigError(f"{checkpoint} was trained with a global batch of {saved} records a step, and this run's is "
                      f"{per_step} (train.batch_size {batch_size} × train.grad_accum {grad_accum} × {world} "
                      f"processes); a resumed run keeps the global batch: {fit}")


def _resume_optimizer(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path,
                      state: dict[str, Any]) -> None:
    """The checkpoint's optimizer state into this run's, whichever layout wrote it and whichever this run has."""
    if (checkpoint / "optimizer").is_dir():  # a sharded run's DCP shards: they reshard to this layout
        load_optimizer(policy, optimizer, checkpoint / "optimizer")
    elif is_sharded(policy):
        load_full_optimizer(policy, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])


def _shard_models(session: Session, c: Config) -> None:
    """Shard the student (train.sharding=fsdp) and the frozen teacher (teacher.sharding=fsdp) over the processes,
    in place, and log what each rank holds."""
    for role, model, on, trainable in (("student", session.policy, c.train.sharding == "fsdp", True),
                                       ("teacher", session.teacher, c.teacher.sharding == "fsdp", False)):
        if model is None or not on:
            continue
        shard(model, session.device, trainable, c.train.fsdp_cpu_offload and trainable)
        local, full = parameter_bytes(model)
        log.info("rank %d holds %.1f MB of the %s's %.1f MB of parameters (sharded)",
                 session.accelerator.process_index, local / 2**20, role, full / 2**20)


def _accumulating(student: torch.nn.Module, accelerator: Accelerator, sync: bool) -> Any:
    """Where a micro-batch's backward runs: gradients reduce across ranks only on the last micro-batch."""
    if is_sharded(student):
        return gradient_sync(student, sync)
    return accelerator.no_sync(student) if not sync else nullcontext()


def _backward(loss: torch.Tensor, student: torch.nn.Module, accelerator: Accelerator) -> None:
    if is_sharded(student):
        loss.backward()  # FSDP2's hooks reduce-scatter the gradients
    else:
        accelerator.backward(loss)


def _listen_for_stop(stop: dict[str, Any]) -> Callable[[], None]:
    """SIGTERM and a first Ctrl-C (SIGINT) set stop["signal"]: the loop finishes the step, saves a checkpoint
    and stops. A second Ctrl-C aborts at once. Returns what restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: stopping after this step with a checkpoint; press Ctrl-C again to abort without one")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore
