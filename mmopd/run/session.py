"""A run's loaded and checked world: data, models, processors and the action space, before any step.

`Session` validates at the edge (records, context lengths, the teacher-student pair, dtypes), so the
training loop and the evaluation can trust what they get.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from mmopd.config import Config, ConfigError, DataConfig, TeacherConfig, check_modality_options
from mmopd.data.privileged import privileged_count, privileged_check, teacher_view
from mmopd.data.records import DataError, Dataset, load_records
from mmopd.engines.routed import check_same_vocabulary, routing_check
from mmopd.models.adapter import ModelLoadError, PolicySide, eval_check, get_adapter, settings_of
from mmopd.models.compat import IncompatibleModelsError, same_tokenizer
from mmopd.models.hf import context_length
from mmopd.run.evaluation import evaluate_policy, kl_to_teacher
from mmopd.run.objectives import Models
from mmopd.step.objective_table import DISTRIBUTION, TEACHER, needs_answers, needs_teacher, row_of, scores_teacher
from mmopd.step.rewards import reads_answers, refusal

log = logging.getLogger("mmopd")


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


def pad_of(processor: Any, eos_ids: list[int]) -> int:
    """The id that pads a model's rows: its processor's pad token, else its first EOS."""
    pad = getattr(processor, "pad_token_id", None)
    return eos_ids[0] if pad is None else pad


class Session:
    """Everything a run needs, loaded and checked: data, models, processors, the action space."""

    def __init__(self, config: Config, for_eval: bool = False, student_override: str | Path | None = None,
                 need_teacher: bool | None = None, accelerator: Accelerator | None = None):
        self.config = config
        self.adapter = get_adapter(config.modality, settings_of(config))  # its import registers its options
        self.options = check_modality_options(config, training=not for_eval)
        why = refusal(config.objective.reward, self.adapter) if config.objective.reward and not for_eval else None
        if why:
            raise ConfigError(why)
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        c = config
        d, check = c.data, self.adapter.check_record
        if d.teacher_prompt_field:
            check = privileged_check(check, d.teacher_prompt_field, self.adapter.teacher_prompt_refusal)
        train_check = routing_check(check, d.teacher_field, [t.name for t in c.teachers]) if c.teachers else check
        self.train_data = None if for_eval else load_records(d.train, train_check, d.skip_bad, "data.train",
                                                             d.fields, d.split, d.subset)
        if d.eval:
            self.eval_data = load_records(d.eval, eval_check(self.adapter, check), d.skip_bad, "data.eval", d.fields,
                                          d.eval_split, d.subset)
        elif for_eval:
            raise ConfigError("data.eval is required to evaluate: a file, save_to_disk folder or hub id of eval "
                              "records")
        else:
            self.eval_data = None
        o = c.objective
        if self.train_data is not None and needs_answers(o.kind, o.estimator, o.lmbda, o.sft_weight,
                                                         reads_answers(o.reward)):
            missing = next((r for r in self.train_data.records if not r.get("answer")), None)
            if missing is not None:
                why = " with sft_weight" if o.sft_weight else f" with reward {o.reward}" if o.reward else ""
                raise DataError(f"{missing['_where']}: objective {o.kind}{why} needs an 'answer' in every "
                                "record (a conversational record: a last assistant turn)")

        self.student_processor = self.adapter.load_processor(c.student.path, "student")
        student_path = str(student_override) if student_override else c.student.path
        self.student_path = student_path
        s_dtype = resolve_dtype(c.student.dtype, self.device, "student")
        if c.student.dtype == "auto" and not for_eval:
            s_dtype = torch.float32  # fp32 master weights; accelerate autocasts to bf16 where supported
        self.student_dtype = s_dtype
        self.policy = self.adapter.calls.load_model(student_path, "student", s_dtype).to(self.device)
        want_teacher = needs_teacher(o.kind, o.estimator, o.kl_weight) if need_teacher is None else need_teacher
        self.teacher, self.teacher_processor = None, None
        self.teachers: dict[str, tuple[torch.nn.Module, Any]] = {}  # several teachers: name -> (model, processor)
        self.cross_tokenizer = False  # the teacher reads the responses through another tokenizer
        if want_teacher and c.teacher.cfg_scale != 1.0 and not self.options.guidance:
            raise IncompatibleModelsError(
                f"teacher.cfg_scale={c.teacher.cfg_scale} asks for classifier-free guidance, but {c.modality} "
                "models have no unconditional branch; set teacher.cfg_scale=1.0")
        # a vLLM teacher (served or colocated) only scores: its engine holds the weights, this process its
        # config and processor, for the prompt encoding and the pair checks
        self.scored = not for_eval and scores_teacher(o.kind, o.estimator, o.kl_weight)
        self.teacher_in_process = self._in_process(c.teacher)
        if want_teacher:
            loaded = {t.name: self._load_teacher(t) for t in c.teachers or [c.teacher]}
            if c.teachers:
                check_same_vocabulary({name: processor for name, (_, processor) in loaded.items()})
                self.teachers = loaded
            for model, processor in loaded.values():
                self.adapter.check_pair(self.student_processor, processor, self.policy, model)
            self.teacher, self.teacher_processor = next(iter(loaded.values()))
            self.cross_tokenizer = self.adapter.aligns_text and not same_tokenizer(self.student_processor,
                                                                                   self.teacher_processor)
            if self.cross_tokenizer:
                check_cross_tokenizer_run(c, for_eval)
        self.space = self.adapter.token_space(self.student_processor, self.policy)  # checks the response length
        self.eval_privileged = 0  # eval records with a teacher-only prompt (counted with the prompts' check)
        self._train_set: str | None = None  # the training records' digest (train_set), once asked
        for data in (self.train_data, self.eval_data):
            if data is not None:
                self._drop_unusable_prompts(data)
        self.eos_ids = self.adapter.eos_token_ids(self.student_processor)
        self.pad_id = pad_of(self.student_processor, self.eos_ids)

    def _in_process(self, t: TeacherConfig) -> bool:
        """Whether teacher `t`'s weights load here: not for a vLLM teacher that scores (its engine holds them)."""
        return t.engine == "hf" or not self.scored

    def _load_teacher(self, t: TeacherConfig) -> tuple[torch.nn.Module, Any]:
        """One teacher's frozen model (for a vLLM teacher a weightless skeleton from its config) and processor."""
        processor = self._teacher_processor(t)
        if not self._in_process(t):
            return self.adapter.calls.load_skeleton(t.path, "teacher"), processor
        model = self.adapter.calls.load_model(t.path, "teacher", resolve_dtype(t.dtype, self.device, "teacher"))
        return model.to(self.device).eval().requires_grad_(False), processor

    def _teacher_processor(self, t: TeacherConfig) -> Any:
        """The teacher's tokenizer or processor; a vLLM teacher's path must hold it beside its config."""
        try:
            return self.adapter.load_processor(t.path, "teacher")
        except ModelLoadError as err:
            if self._in_process(t):
                raise
            raise ModelLoadError(f"{err}. teacher.engine=vllm still reads teacher.path in the trainer, for the "
                                 "prompt encoding and the pair checks: its config and tokenizer (or processor) "
                                 "files, not its weights") from err

    def _drop_unusable_prompts(self, data: Dataset, chunk: int = 1024) -> None:
        """Refuse (or with data.skip_bad, skip and count) prompts that leave no room for the response, or that the
        adapter finds the student cannot read; a teacher-only prompt likewise for the teacher."""
        teachers = [model for model, _ in self.teachers.values()] or [self.teacher]
        limits = [context_length(m) for m in (self.policy, *teachers) if m is not None]
        limit = min([n for n in limits if n is not None], default=None)
        dropped: list[int] = []
        privileged = 0
        for start in range(0, len(data), chunk):
            records = data.records[start:start + chunk]
            privileged += privileged_count(records)
            for i, (record, found) in enumerate(zip(records, self._prompt_problems(records, limit))):
                if found is None:
                    continue
                problem, fix = found
                if not self.config.data.skip_bad:
                    raise DataError(f"{record['_where']}: {problem}; {fix} or set data.skip_bad=true")
                log.warning("skipping %s: %s", record["_where"], problem)
                dropped.append(start + i)
        if len(dropped) == len(data):
            raise DataError(f"{data.path} holds no prompt the models can use ({len(dropped)} skipped)")
        data.drop(dropped)
        self._report_teacher_prompts(data, privileged)

    def _prompt_problems(self, records: list[dict], limit: int | None) -> list[tuple[str, str] | None]:
        """Per record, what makes its prompt unusable and how to fix it, or None: the student's prompt as the
        student reads it, then a teacher-only prompt as the teacher reads it."""
        max_new = self.config.rollout.max_new_tokens
        sides = [("the prompt", records, self.student_processor)]
        if self.teacher is not None and privileged_count(records):
            sides.append(("the teacher's prompt", teacher_view(records), self.teacher_processor))
        found: list[tuple[str, str] | None] = [None] * len(records)
        for what, viewed, processor in sides:
            for i, length in enumerate(self.adapter.measure_prompts(viewed, processor)):  # lengths, or why not
                if found[i] is not None:
                    continue
                if isinstance(length, str):
                    found[i] = (length, "use a tokenizer that does, fix the record")
                elif isinstance(length, int) and limit is not None and length + max_new > limit:
                    found[i] = (f"{what} is {length} tokens, and with rollout.max_new_tokens={max_new} it exceeds "
                                f"the models' context of {limit} tokens", "shorten it, lower rollout.max_new_tokens")
        return found

    def _report_teacher_prompts(self, data: Dataset, privileged: int) -> None:
        """Say how many records give the teacher a prompt of its own (the rest give it `prompt`); refuse a
        data.teacher_prompt_field set to another field than the default that no training record carries."""
        field = self.config.data.teacher_prompt_field
        if data is self.eval_data:
            self.eval_privileged = privileged
        if privileged:
            uses = "the teacher reads 'prompt' for the rest" if self.teacher is not None else \
                "this run loads no teacher, so none is read"
            log.info("%s: %d of %d records carry a teacher-only prompt (%r); %s", data.path, privileged, len(data),
                     field, uses)
        elif data is self.train_data and field and field != DataConfig.teacher_prompt_field:
            raise DataError(f"data.teacher_prompt_field={field!r}, but no record of {data.path} carries {field!r}; "
                            "name the field that holds the teacher's prompts, or clear data.teacher_prompt_field")

    def side(self, model: torch.nn.Module, processor: Any) -> PolicySide:
        """`model` with its processor and the run's token space, EOS ids and pad id: what sampling it needs (a
        teacher with another tokenizer samples its own tokens)."""
        if self.cross_tokenizer and processor is self.teacher_processor:
            eos = self.adapter.eos_token_ids(processor)
            return PolicySide(self.adapter, model, processor, self.adapter.token_space(processor, model), eos,
                              pad_of(processor, eos))
        return PolicySide(self.adapter, model, processor, self.space, self.eos_ids, self.pad_id)

    def models(self, student: torch.nn.Module | None = None) -> Models:
        """What objective_step needs; `student` is the (possibly DDP-wrapped) model being trained."""
        teacher = self.side(self.teacher, self.teacher_processor) if self.teacher is not None else None
        return Models(student if student is not None else self.policy, self.side(self.policy, self.student_processor),
                      teacher, self.device, student_path=self.student_path,
                      writer=self.accelerator.is_main_process, teachers=self.teachers,
                      cross_tokenizer=self.cross_tokenizer).with_engines(self.config)

    def evaluate(self, model: torch.nn.Module, processor: Any, desc: str = "eval", progress: bool = False,
                 privileged: bool = False) -> dict[str, Any]:
        """`model`'s eval on data.eval; `privileged`: a teacher reading each record's teacher-only prompt (where it
        has one), which the student never sees, so that score is no bar the student could reach."""
        records = self.eval_data.records
        if self.config.data.eval_limit:
            records = records[: self.config.data.eval_limit]
        if privileged:
            records = teacher_view(list(records))
        return evaluate_policy(self.side(model, processor), records, self.config.rollout.max_new_tokens,
                               self.config.train.eval_batch_size, self.device,
                               desc=desc, progress=progress)

    def train_set(self) -> str:
        """Which records training reads, as a digest of the set's size and a spread sample of its rows (checkpoints
        name it, so that a resume on a replaced data.train is caught); computed once."""
        if self._train_set is None:
            self._train_set = self.train_data.records.sample_fingerprint()
        return self._train_set

    def eval_set(self) -> str:
        """Which records `evaluate` scores (data.eval's first data.eval_limit), as a digest of their rows."""
        return self.eval_data.records.fingerprint(self.config.data.eval_limit)

    def starting_student(self) -> torch.nn.Module:
        """The student as training started, loaded again from student.path (a LoRA student's base, which its
        zero-initialised adapters leave unchanged)."""
        model = self.adapter.calls.load_model(self.config.student.path, "student", self.student_dtype)
        return model.to(self.device).eval()

    def eval_kl(self, model: torch.nn.Module) -> dict[str, float] | None:
        """The student's per-token `reverse_kl` (its own samples) and `forward_kl` (the teacher's samples) to the
        teacher on the first train.eval_kl_prompts eval prompts; None where the adapter does not report them, the
        teacher is not in this process (or there are several, or it has another tokenizer), or
        train.eval_kl_prompts is 0."""
        n = self.config.train.eval_kl_prompts
        if not (n and self.adapter.reports_kl and self.eval_data is not None and self.teacher is not None
                and self.teacher_in_process and not self.teachers and not self.cross_tokenizer):
            return None
        records = self.eval_data.records[: min(n, self.config.data.eval_limit or n)]
        return kl_to_teacher(self.side(model, self.student_processor), self.side(self.teacher, self.teacher_processor),
                             records, self.config.rollout.max_new_tokens, self.config.train.eval_batch_size,
                             self.device)


def check_cross_tokenizer_run(config: Config, for_eval: bool) -> None:
    """Refuse, in one line, what a teacher with another tokenizer cannot do yet: anything but the sampled span
    estimator of on_policy (the full estimator needs the teacher's distribution over the student's tokens), several
    teachers, a vLLM teacher."""
    o, t = config.objective, config.teacher
    row = row_of(o.kind, o.estimator, o.kl_weight)
    where = "the teacher's tokenizer differs from the student's"
    if for_eval:
        return
    if row.teacher == DISTRIBUTION:
        raise ConfigError(f"objective.kind={o.kind} with estimator={o.estimator} needs the teacher's distribution over "
                          f"the student's tokens, and {where}; use objective.kind=on_policy with "
                          "objective.estimator=sampled (span log-ratios), the one estimator across tokenizers for now")
    if row.responses == TEACHER:
        raise ConfigError(f"objective.kind={o.kind} trains on the teacher's own tokens, and {where}; use "
                          "objective.kind=on_policy with objective.estimator=sampled")
    if config.teachers:
        raise ConfigError(f"several teachers are not supported where {where} yet; give one teacher")
    if t.engine != "hf":
        raise ConfigError(f"teacher.engine={t.engine} is not supported where {where} yet; use teacher.engine=hf")


def evaluate(config: Config, checkpoint: str | Path | None = None, which: str = "student") -> dict[str, float]:
    """Evaluate the student (or `which="teacher"`, or a checkpoint's student) on `data.eval`."""
    if which == "teacher" and config.teachers:
        raise ConfigError("several teachers: evaluate one at a time, with a config whose teacher is that one mapping")
    session = Session(config, for_eval=True, student_override=checkpoint, need_teacher=which == "teacher")
    model, processor = (session.teacher, session.teacher_processor) if which == "teacher" \
        else (session.policy, session.student_processor)
    result = session.evaluate(model, processor, desc=f"eval {which}", progress=config.train.progress)
    return result["metrics"]
