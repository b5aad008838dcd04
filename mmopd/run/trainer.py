"""The training loop, top to bottom: load, check, then step, log, evaluate and checkpoint.

Global batch per optimizer step = train.batch_size × train.grad_accum × processes. Which records form
step s, and every random draw inside it, depend only on (seed, s, micro-batch, rank), so a resumed run
repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import InitProcessGroupKwargs

from mmopd.config import Config, ConfigError, TrainConfig, save_config
from mmopd.data.step_order import step_indices
from mmopd.models.adapter import prepare_trainable
from mmopd.models.checkpoint import check_global_batch, set_rng_state, trainer_state
from mmopd.models.lora import load_lora_weights
from mmopd.models.sharding import Parallel, decoder_layers, parallel, parameter_bytes, shard
from mmopd.run.objectives import Models, Plan, Timer, check_engine, objective_step, teacher_sample_entropy
from mmopd.run.report import MetricsLog, Progress, add_final_eval, eval_row, finish
from mmopd.run.ranks import check_same_records, open_shared_run, stop_on_lost_peer
from mmopd.run.rundir import Run, RunDirError, apply_resume_changes, record_segment
from mmopd.run.schedule import warmup_cosine
from mmopd.run.session import Session
from mmopd.step.health import HealthMonitor
from mmopd.step.objective_table import STUDENT, STUDENT_OR_ANSWERS

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
                              project_dir=t.out_dir, kwargs_handlers=[_collective_timeout(t.collective_timeout)])
    check_distributed(accelerator, c)
    with stop_on_lost_peer(accelerator, c):  # a process that dies or freezes stops the others in one line
        run = open_shared_run(c, accelerator)  # before any model loads: lock, clean up, where to start
        # every rank listens (a scheduler's SIGTERM reaches them all); they agree on the stop step through the
        # per-step metrics reduce, so all of them finish that step, wait for the checkpoint and exit together
        stop: dict[str, Any] = {"signal": None}
        restore_signals = _listen_for_stop(stop)
        try:
            if run.finished is not None:
                log.warning("%s already did all %d steps; nothing to train (raise train.steps to continue)",
                            run.out, t.steps)
                return run.finished
            with contextlib.ExitStack() as cleanup:  # the engines' weight copies go however the run ends
                summary = _train(c, accelerator, run, stop, cleanup)
            accelerator.end_training()  # after the final evaluation, which a sharded model runs on every rank
            return summary
        finally:
            restore_signals()
            run.close()


def _collective_timeout(seconds: float) -> InitProcessGroupKwargs:
    """The process group's bound on every collective wait (`train.collective_timeout`), passed on whatever its value:
    accelerate's handler would drop one equal to its NCCL default (600 s), and gloo's own default is 1800 s."""
    handler = InitProcessGroupKwargs(timeout=timedelta(seconds=seconds))
    handler.to_kwargs = lambda: {"timeout": handler.timeout}
    return handler


def _train(c: Config, accelerator: Accelerator, run: Run, stop: dict[str, Any],
           cleanup: contextlib.ExitStack) -> dict[str, Any]:
    t, main, resume_from = c.train, accelerator.is_main_process, run.resume_from
    per_step = t.batch_size * t.grad_accum * accelerator.num_processes  # records per optimizer step
    if resume_from is not None:
        check_global_batch(run.state.get("global_batch"), per_step, accelerator.num_processes, t.batch_size,
                           t.grad_accum, resume_from)
    live = t.progress and sys.stderr.isatty()  # off a terminal, plain log lines instead of a redrawn bar
    session = _load_student(c, accelerator, run)
    params = [p for p in session.policy.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)  # sharded params: sharded state
    # the scheduler stays unprepared: accelerate would step it once per process, but ours counts optimizer steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, warmup_cosine(t.warmup, t.steps))
    par = parallel(accelerator, session.policy, adamw, session.teacher, t.sharding == "fsdp")
    models = session.models(par.student)
    cleanup.callback(models.close)
    metrics_log = MetricsLog(run.out / "metrics.jsonl")
    state = _start_segment(c, run, par, scheduler, metrics_log)
    evaluating = session.eval_data is not None and (main or par.every_rank_samples)  # then every rank evaluates
    if evaluating and (resume_from is None or _baseline_is_stale(state["baseline"], session.eval_set(), run)):
        _baseline(session, par, metrics_log, state["baseline"], live, resumed=resume_from is not None)
    if not models.rollout.exact:
        _sync_engine(models, par)  # the engine loaded the student's path; a resumed or LoRA student differs from it
        check_engine(models, session.train_data.records[:4], c)
    bad_in_row, stop_name, plan = 0, None, Plan.of(c)
    health = _health_monitor(c, session, models, plan, par, state)
    progress = Progress(metrics_log, health, t.steps, state["step"], t.log_every, main, live, t.progress,
                        accelerator.log if t.report_to else None)
    par.student.train()
    for step in range(state["step"], t.steps):
        timer, started = Timer(), time.perf_counter()
        row = _micro_batches(models, plan, par, session.train_data.records, step, per_step, t, timer)
        row, stopping = par.mean_over_ranks(row, stop["signal"] is not None)  # any rank's SIGTERM stops all
        # a remote rank's stop reads as SIGTERM
        stop_name = signal.Signals(stop["signal"] or signal.SIGTERM).name if stopping else None
        grad_norm = par.clip(t.max_grad_norm)
        bad_in_row = _update(models, par, row, grad_norm, state, bad_in_row, step, timer, c, run.out)
        scheduler.step()
        par.optimizer.zero_grad(set_to_none=True)
        progress.step(_step_row(row, step, scheduler, grad_norm, state, timer, started, t.grad_accum * par.world))
        done = step + 1
        if evaluating and t.eval_every and done % t.eval_every == 0 and done < t.steps:
            _evaluate(session, par, metrics_log, done)
        if (t.save_every and done % t.save_every == 0) or done == t.steps or stopping:
            state["step"] = done
            par.save(run.out, done, session.student_processor, trainer_state(
                done, scheduler, state["baseline"], state["skipped_steps"], c.to_dict(), run.run_id, per_step,
                health.state(), session.train_set()), t.keep_last, run.run_id)
        if stopping:
            log.warning("%s: saved checkpoint step-%d and stopped; rerun the same command to resume", stop_name, done)
            break
    progress.close()
    summary = {"metric": session.adapter.metric, **state["baseline"], "steps": state["step"],
               "health_warnings": health.warnings}
    if stop_name is not None:
        return {**summary, "stopped_by": stop_name}
    if evaluating:
        add_final_eval(summary, *_evaluate(session, par, metrics_log, t.steps, "eval student", live),
                       session.eval_data.records)
    return finish(run.out, summary, session, state["skipped_steps"], main, par.every_rank_samples)


def _health_monitor(c: Config, session: Session, models: Models, plan: Plan, par: Parallel,
                    state: dict[str, Any]) -> HealthMonitor:
    """The sample-health monitor, going on from a resumed run's checkpoint (its warnings kept), with the teacher's
    sample entropy measured once where the relative check needs it: on the prompts of step 1's first micro-batch,
    where the teacher is in this process (every rank samples them: a sharded teacher needs them all)."""
    t = c.train
    health = HealthMonitor(t.health_min_entropy, t.health_max_repeat, t.health_max_length, bool(session.eos_ids),
                           t.health_min_entropy_ratio)
    health.restore(state.get("health"))
    responses = plan.row.responses
    if not t.health_min_entropy_ratio or not (responses == STUDENT or responses == STUDENT_OR_ANSWERS and plan.lmbda):
        return health  # off, or the student never samples
    why_not = ("no teacher is loaded" if session.teacher is None
               else f"teacher.engine={c.teacher.engine} holds the teacher's weights" if not session.teacher_in_process
               else "several teachers have no one reference" if session.teachers
               else "the teacher's tokens are not the student's" if session.cross_tokenizer else None)
    if why_not:
        if par.main:
            log.info("sample health: %s, so the student's entropy is not checked against the teacher's samples "
                     "(train.health_min_entropy_ratio); the absolute checks stand", why_not)
        return health
    r = c.rollout
    basis = {"teacher": c.teacher.path, "train": c.data.train, "batch_size": t.batch_size, "seed": t.seed,
             "samples_per_prompt": r.samples_per_prompt, "max_new_tokens": r.max_new_tokens,
             "temperature": r.temperature, "top_k": r.top_k, "top_p": r.top_p}
    if health.teacher_entropy is None or health.teacher_basis != basis:  # once; again where a resume changed these
        health.teacher_basis = basis
        records = session.train_data.records
        first = step_indices(len(records), 0, t.batch_size * t.grad_accum * par.world, t.seed)[:t.batch_size]
        generator = torch.Generator(session.device).manual_seed(t.seed)
        health.teacher_entropy = teacher_sample_entropy(models, [records[i] for i in first], plan, generator)
        par.reshard_teacher()
    if par.main:
        log.info("sample health: the teacher's own samples have a token entropy of %.2f nats (step 1's prompts, at "
                 "the rollout's sampling); the student's warn below %.2f (train.health_min_entropy_ratio=%g)",
                 health.teacher_entropy, t.health_min_entropy_ratio * health.teacher_entropy,
                 t.health_min_entropy_ratio)
    return health


def _check_train_set(session: Session, run: Run, c: Config) -> None:
    """On resume, the training records' digest against the one the checkpoint names: a data.train replaced
    at the same path (other rows, more or fewer) would go on with other records and another step order without a
    word. Refused unless train.resume_changes lists data.train (then a warning); a checkpoint that names no set (an
    earlier mmopd's) is not checked."""
    digest = session.train_set()
    saved = (run.state or {}).get("train_set")
    if run.resume_from is None or not saved or saved == digest:
        return
    message = (f"data.train={c.data.train} holds other records than {run.resume_from.name} was trained on ({saved} "
               f"-> {digest}): the file was replaced or edited since")
    if "data.train" in c.train.resume_changes:
        log.warning("%s; going on with these records, as train.resume_changes lists data.train", message)
        return
    raise RunDirError(f"{message}. Restore it, start a new run in another train.out_dir, or go on with these records "
                      "with 'train.resume_changes=[data.train]'")


def _load_student(c: Config, accelerator: Accelerator, run: Run) -> Session:
    """The session with the student ready to train: from the checkpoint it resumes (a LoRA student's adapters on
    the original student; its training records checked to be the checkpoint's), activation-checkpointed if asked,
    made trainable, and sharded with the teacher if asked."""
    resume_from = run.resume_from
    lora_resume = resume_from is not None and c.student.trainable == "lora"
    session = Session(c, student_override=resume_from / "model" if resume_from and not lora_resume else None,
                      accelerator=accelerator)
    check_same_records(accelerator, {"data.train": session.train_set()})
    _check_train_set(session, run, c)
    if c.student.gradient_checkpointing:
        session.policy.gradient_checkpointing_enable()
        layers = decoder_layers(session.policy)
        log.info("student: activation checkpointing in %d of its %d decoder layers",
                 sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers), len(layers))
    # what prepare_trainable initialises (LoRA's A) follows train.seed: the same on every rank, as sharding needs
    # (each rank keeps its own slice of it), and in every run
    torch.manual_seed(c.train.seed)
    session.policy = prepare_trainable(session.adapter, session.policy, c.student)
    if lora_resume:
        load_lora_weights(session.policy, resume_from / "lora")
    _shard_models(session, c)
    return session


def _start_segment(c: Config, run: Run, par: Parallel, scheduler: Any, metrics_log: MetricsLog) -> dict[str, Any]:
    """Where this segment of the run starts: a resumed run's optimizer, schedule, changes, RNG and metrics as its
    checkpoint left them, or step 0; record the segment and start the trackers. Returns the trainer state."""
    main = par.main
    state: dict[str, Any] = {"step": 0, "baseline": {}, "skipped_steps": 0}
    if run.resume_from is not None:
        state = run.state
        par.load_optimizer(run.resume_from, state)
        scheduler.load_state_dict(state["scheduler"])
        apply_resume_changes(run, par.optimizer, scheduler, c.train)
        set_rng_state(state["rng"])
        if main:
            metrics_log.supersede_after(state["step"])
            log.info("resumed from %s at step %d", run.resume_from, state["step"])
    elif main:
        metrics_log.supersede_after(-1)  # a restart of the same config from step 0 (open_run checked)
    if main:
        save_config(c, run.out / "config.yaml")  # what this segment runs; segments.jsonl keeps the earlier ones
        record_segment(run, c)
    if c.train.report_to:
        par.accelerator.init_trackers("mmopd", config=c.to_dict())
    return state


EVAL_KEYS = ("data.eval", "data.eval_split", "data.eval_limit", "data.subset")


def _baseline_is_stale(baseline: dict[str, Any], eval_set: str, run: Run) -> bool:
    """Whether a resumed run's baseline was measured on other eval records than this segment's (data.eval may
    change on resume): "before" and "after" must be measured on the same set. A baseline of an earlier mmopd names
    no set; it stands unless the config's eval keys changed."""
    if "eval_set" not in baseline and "student_before" in baseline:
        return any(key in run.changes for key in EVAL_KEYS)
    return baseline.get("eval_set") != eval_set


def _baseline(session: Session, par: Parallel, metrics_log: MetricsLog, baseline: dict[str, Any], live: bool,
              resumed: bool = False) -> None:
    """The eval scores before training: the teacher's (where one teacher is in this process) on the student's prompts,
    on its own teacher-only prompts as well where eval records carry them, and the student's, with its KL to the
    teacher, into `baseline`, with the eval set they were measured on. `resumed`: a resumed
    run's eval set changed, so the starting student is loaded again from student.path and measured on the new set
    (not logged as a step's eval row)."""
    if resumed:
        log.warning("the eval records differ from those the run's baseline was measured on; measuring the teacher "
                    "and the starting student (student.path) on them, so that before and after compare")
    baseline.clear()
    baseline["eval_set"] = session.eval_set()
    if session.teacher is not None and not session.teacher_in_process:
        log.info("teacher.engine=vllm: the teacher's eval baseline is not measured (its weights are in its "
                 "engine, not in this process); `mmopd eval CONFIG --teacher` loads and measures it")
    elif session.teacher is not None and not session.teachers:  # several: no one teacher answers every prompt
        baseline["teacher"] = session.evaluate(session.teacher, session.teacher_processor, "eval teacher",
                                               live)["metrics"][session.adapter.metric]
        if session.eval_privileged:  # what the teacher scores with its privileged context: no bar for the student
            baseline["teacher_privileged"] = session.evaluate(session.teacher, session.teacher_processor,
                                                              "eval teacher (privileged)", live,
                                                              privileged=True)["metrics"][session.adapter.metric]
    if resumed:
        starting = session.starting_student()
        result, kl = session.evaluate(starting, session.student_processor, "eval starting student", live), \
            session.eval_kl(starting)
        par.reshard_teacher()
        del starting
    else:
        result, kl = _evaluate(session, par, metrics_log, 0, "eval student", live)
    baseline["student_before"] = result["metrics"][session.adapter.metric]
    if kl is not None:
        baseline["kl_before"] = kl


def _evaluate(session: Session, par: Parallel, metrics_log: MetricsLog, step: int, desc: str = "eval",
              live: bool = False) -> tuple[dict[str, Any], dict[str, float] | None]:
    """Evaluate the student and its KL to the teacher, and log them as step `step`'s eval row."""
    result = session.evaluate(par.policy, session.student_processor, desc, live)
    kl = session.eval_kl(par.policy)
    par.reshard_teacher()
    if par.main:
        metrics_log.write(eval_row(step, session.adapter.metric, result["metrics"][session.adapter.metric], kl))
    return result, kl


def _micro_batches(models: Models, plan: Plan, par: Parallel, records: list[dict], step: int, per_step: int,
                   t: TrainConfig, timer: Timer) -> dict[str, float]:
    """Forward and backward this rank's micro-batches of global batch `step`; their metrics' mean."""
    batch = step_indices(len(records), step, per_step, t.seed)
    rows = []
    for micro in range(t.grad_accum):
        slot = micro * par.world + par.rank  # this micro-batch's place in the global batch
        micro_records = [records[i] for i in batch[slot * t.batch_size:(slot + 1) * t.batch_size]]
        # seeded by global slot, so 2 processes × 1 micro-batch sample exactly what 1 × 2 does
        generator = torch.Generator(par.accelerator.device).manual_seed((t.seed * 1_000_003 + step) * 1_009 + slot)
        with par.accumulating(sync=micro == t.grad_accum - 1):
            rows.append(objective_step(models, micro_records, plan, generator, timer,
                                       lambda loss: par.backward(loss / t.grad_accum)))
        par.reshard_teacher()
    return _mean_rows(rows)


def _update(models: Models, par: Parallel, row: dict[str, float], grad_norm: torch.Tensor, state: dict[str, Any],
            bad_in_row: int, step: int, timer: Timer, c: Config, out: Path) -> int:
    """Step the optimizer and sync the rollout engine, or skip a non-finite step (and abort after 5 in a row);
    return how many non-finite steps in a row end here."""
    if math.isfinite(row["loss"]) and math.isfinite(float(grad_norm)):
        par.optimizer.step()
        with timer.phase("sync"):  # the rollout engine samples from the new weights from here on
            _sync_engine(models, par)
        return 0
    state["skipped_steps"] += 1
    bad_in_row += 1
    log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); skipped the update",
                step + 1, row["loss"], float(grad_norm))
    if bad_in_row >= 5:
        raise TrainingAborted(f"{bad_in_row} non-finite steps in a row at step {step + 1}; stopping. "
                              f"The last good checkpoint in {out / 'checkpoints'} is intact. To continue "
                              "from it with a lower learning rate, rerun the same command with "
                              f"train.lr={c.train.lr / 10:g} 'train.resume_changes=[train.lr]', or check the data")
    return bad_in_row


def _step_row(row: dict[str, Any], step: int, scheduler: Any, grad_norm: torch.Tensor, state: dict[str, Any],
              timer: Timer, started: float, micro_batches: int) -> dict[str, Any]:
    """Step `step`'s metrics.jsonl row: the micro-batches' mean, the schedule, the gradient norm and the timings
    (`micro_batches` over all processes)."""
    elapsed = time.perf_counter() - started
    tokens = row["response_tokens"] * micro_batches
    row.update(step=step + 1, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
               tokens_per_s=tokens / elapsed, skipped_steps=state["skipped_steps"],
               **{f"time/{k}": v for k, v in timer.seconds.items()}, **{"time/step": elapsed})
    row.setdefault("divergence", None)
    return row


def _sync_engine(models: Models, par: Parallel) -> None:
    models.rollout.sync(par.policy)
    if not models.rollout.exact and par.world > 1:
        par.accelerator.wait_for_everyone()  # a shared engine has the new weights before any rank samples


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
