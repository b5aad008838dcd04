"""One distillation step, for every objective and modality: the four moves of docs/architecture.md.

Trace of one on_policy step with the fused full estimator (prompt → rollout → teacher → divergence → update),
inside the trainer's loop (`mmopd/run/trainer.py: train`, which calls `objective_step` per micro-batch and then
`optimizer.step()`):

1. `mmopd/run/objectives.py: objective_step` encodes the prompts (the adapter's `encode_prompts`, once per
   model); the objective's row of `mmopd/step/objective_table.py` is in the run's `Plan`, resolved once at start.
2. rollout: `mmopd/engines/hf.py: HFRollout.sample` → `rollout` → the adapter's `start` / `step`
   (`mmopd/models/adapter.py`, the HF defaults) → `sample` per token.
3. teacher: `mmopd/engines/hf.py: HFTeacher.score` → `model_scores` → the adapter's `response_hidden` →
   a `Hidden` score (`mmopd/step/scores.py`).
4. divergence: the student's `model_scores` → `Hidden.divergence(teacher)` (`mmopd/step/scores.py`) →
   `fused_divergence_loss` (`mmopd/losses/fused.py`), which computes the loss and its gradients together.
5. update: `backward(loss)`, then the trainer steps the optimizer and calls `rollout.sync(student)`.

Where each objective's responses come from, what its teacher supplies and which loss applies is the table
in `mmopd/step/objective_table.py`; `objective.sft_weight > 0` adds that weight times the answers' NLL.
A task reward (`objective.reward`, resolved once into the Plan) scores the decoded responses after the rollout
(`rewarded`); the losses put it in the advantage beside the KL term (`reward_weight`, `kl_weight`).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from mmopd.config import Config, ConfigError, RolloutConfig
from mmopd.data.privileged import teacher_view
from mmopd.engines import (DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, EngineError, RolloutEngine, TeacherNeed, TeacherScorer,
                           model_scores, rollout_engine, teacher_scorer)
from mmopd.engines.cross_tokenizer import cross_tokenizer_teacher
from mmopd.engines.routed import RECORDS, RoutedTeacher
from mmopd.losses import Shaping, masked_mean, policy_gradient_loss, reward_advantage
from mmopd.models.adapter import ModalityAdapter, PolicySide, fused_unsupported
from mmopd.registry import Registry
from mmopd.step.batch import PromptBatch, Rollout, Sampling, answers_rollout
from mmopd.step.health import sample_health, token_entropy
from mmopd.step.objective_table import (ANSWERS, DIVERGENCE, NLL, POLICY_GRADIENT, SAMPLED, STUDENT_OR_ANSWERS,
                                        TEACHER, Row, row_of, scores_teacher)
from mmopd.step.rewards import Reward, resolve_reward, reward_metrics, rewards_of
from mmopd.step.scores import Scores

log = logging.getLogger("mmopd")


@dataclass
class Models:
    """What one step touches: the student as trained, each model's side (its adapter, model, processor, token space,
    EOS ids and pad id), the device and the engines."""

    student: nn.Module  # as trained (possibly wrapped for DDP)
    policy: PolicySide  # the student's side, its model unwrapped, for sampling
    teacher: PolicySide | None  # the teacher's (its own token space, EOS and pad where it has another tokenizer)
    device: torch.device
    fused: bool = False  # score from hidden states and LM heads (see use_fused)
    student_path: str = ""  # where the student was loaded from (a colocated engine loads it too)
    writer: bool = True  # this process sends the student's weights to a shared engine at sync
    rollout: RolloutEngine | None = None  # samples from the student
    teacher_rollout: RolloutEngine | None = None  # samples from the teacher (seq_kd)
    scorer: TeacherScorer | None = None  # scores responses with the teacher
    teachers: dict[str, tuple[nn.Module, Any]] = field(default_factory=dict)  # several: name -> (model, processor)
    cross_tokenizer: bool = False  # the teacher reads the responses through another tokenizer (character spans)

    @property
    def adapter(self) -> ModalityAdapter:
        return self.policy.adapter

    def with_engines(self, config: Config) -> "Models":
        """These models with the fusing policy decided and the configured engines built."""
        self.fused = use_fused(self, config)
        self.rollout = rollout_engine(config.rollout.engine, config, self.policy, self.student_path, self.writer)
        if self.teacher is not None:
            self.teacher_rollout = rollout_engine("hf", config, self.teacher)
        obj = config.objective
        scored = self.teacher is not None and scores_teacher(obj.kind, obj.estimator, obj.kl_weight)
        if scored and self.teachers:  # one scorer per teacher (a colocated vLLM teacher's engine starts once)
            self.scorer = RoutedTeacher(self.adapter, {
                t.name: teacher_scorer(replace(config, teacher=t), replace(
                    self.teacher, model=self.teachers[t.name][0], processor=self.teachers[t.name][1]), self.fused)
                for t in config.teachers}, {name: processor for name, (_, processor) in self.teachers.items()})
        elif scored and self.cross_tokenizer:  # the teacher scores its own tokens of the responses' text
            self.scorer = cross_tokenizer_teacher(teacher_scorer(config, self.teacher, self.fused), self.adapter,
                                                  self.policy.processor, self.teacher.processor)
        elif scored:
            self.scorer = teacher_scorer(config, self.teacher, self.fused)
        return self

    def close(self) -> None:
        """Remove what the engines keep outside this process (a vLLM engine's weight copies)."""
        for engine in (self.rollout, self.teacher_rollout):
            if engine is not None:
                engine.close()

    def teacher_prompts(self, records: list[dict]) -> PromptBatch | None:
        """The prompts as the teacher reads them: a record's teacher-only prompt where it has one
        (mmopd/data/privileged.py), else its prompt; several teachers each encode their own rows, from the records."""
        if self.teacher is None:
            return None
        records = teacher_view(records)
        prompts = self.teacher.adapter.encode_prompts(records, self.teacher.processor).to(self.device)
        if self.teachers:
            prompts.state[RECORDS] = records
        return prompts

    def teacher_divergences(self, records: list[dict], loss: Callable[[Rollout], tuple[Tensor, dict[str, float]]],
                            responses: Rollout) -> dict[str, float]:
        """Several teachers: `divergence/<name>`, the loss's divergence over each teacher's rows; else nothing."""
        return self.scorer.divergences(records, loss, responses) if self.teachers else {}


@dataclass
class Timer:
    """Wall-clock seconds per phase (rollout, teacher, student), summed over a step."""

    seconds: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)  # the latest phase's seconds, by name

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.last[name] = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + self.last[name]


def sampling_of(config: Config) -> Sampling:
    r = config.rollout
    return Sampling(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)


def teacher_need(config: Config) -> TeacherNeed:
    """What the objective's row asks the teacher for: the distribution (or its top-k), or token log-probs."""
    obj = config.objective
    if row_of(obj.kind, obj.estimator, obj.kl_weight).teacher == TOKEN_LOGPROBS:
        return TeacherNeed(TOKEN_LOGPROBS, temperature=obj.temperature)
    t = config.teacher
    if not t.top_k:
        return TeacherNeed(DISTRIBUTION)
    return TeacherNeed(TOP_K, k=t.top_k, tail=t.tail or t.engine == "vllm")


def use_fused(m: Models, config: Config) -> bool:
    """Whether this run scores responses from hidden states and LM heads (objective.fused: auto|always|never)."""
    mode = config.objective.fused
    if mode == "never":
        return False
    obj = config.objective
    scores = scores_teacher(obj.kind, obj.estimator, obj.kl_weight)
    scored = scores and config.teacher.engine == "hf"  # a vLLM teacher's engine checks its own head
    roles = {"student": m.student, "teacher": m.teacher.model if scored and m.teacher else None}
    problems = [f"{role}: {why}" for role, model in roles.items()
                if model is not None and (why := fused_unsupported(m.adapter, model)) is not None]
    if m.teachers and scores and teacher_need(config).what == DISTRIBUTION:
        problems.append("several teachers: their full distributions are stacked as logits, each with its own head")
    if problems and mode == "always":
        raise ConfigError(f"objective.fused=always, but {'; '.join(problems)}. Set objective.fused=auto (falls "
                          "back to logits where fusing is unsupported) or never")
    if problems:
        _log_once(f"objective.fused=auto scores from logits, not hidden states: {'; '.join(problems)}")
    return not problems


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info(message)


# (student's scores, teacher's or None, actions [B, T], responses, config) -> (loss [], metrics)
Loss = Callable[[Scores, Any, Tensor, Rollout, Config], tuple[Tensor, dict[str, float]]]
BoundLoss = Callable[[Scores, Any, Tensor, Rollout], tuple[Tensor, dict[str, float]]]  # a Loss with its config
LOSSES: Registry[Loss] = Registry("loss")  # the objective table's `loss` column -> the loss


def weighted_advantage(responses: Rollout, config: Config) -> Tensor | None:
    """λ_R·Â per response [B] (mmopd/losses/sampled.py: reward_advantage), or None where the reward is not trained
    on (none, or objective.reward_weight 0)."""
    obj = config.objective
    if responses.rewards is None or obj.reward_weight == 0:
        return None
    advantage = reward_advantage(responses.rewards, config.rollout.samples_per_prompt,
                                 obj.reward_baseline == "group", obj.reward_std)
    return obj.reward_weight * advantage


@LOSSES.register(DIVERGENCE)
def divergence_loss(student: Scores, teacher: Scores, actions: Tensor, responses: Rollout,
                    config: Config) -> tuple[Tensor, dict[str, float]]:
    """kl_weight × the divergence, plus a task reward's term −λ_R·Â·log p_S(x_t) over the same tokens (log p_S at
    the rollout's temperature: the policy that sampled them)."""
    obj = config.objective
    loss = student.divergence(teacher, responses.mask, obj.divergence, obj.beta, obj.temperature)
    values = {"divergence": loss.item()}
    if obj.kl_weight != 1:
        loss = obj.kl_weight * loss
    reward = weighted_advantage(responses, config)
    if reward is not None:
        logprobs = student.logprobs(actions, config.rollout.temperature or 1.0)
        loss = loss + masked_mean(policy_gradient_loss(logprobs, reward), responses.mask)
    return loss, values


@LOSSES.register(SAMPLED)
def sampled_loss(student: Scores, teacher: Scores, actions: Tensor, responses: Rollout,
                 config: Config) -> tuple[Tensor, dict[str, float]]:
    obj = config.objective
    shaping = Shaping(obj.sampled_kl, obj.baseline, config.rollout.samples_per_prompt, obj.advantage_clip,
                      obj.kl_weight)
    loss, kl_estimate = student.sampled_loss(teacher, actions, responses, obj.temperature, shaping,
                                             weighted_advantage(responses, config))
    return loss, {"divergence": masked_mean(kl_estimate, responses.mask).item(), **teacher.metrics(responses.mask)}


@LOSSES.register(POLICY_GRADIENT)
def reward_only_loss(student: Scores, teacher: None, actions: Tensor, responses: Rollout,
                     config: Config) -> tuple[Tensor, dict[str, float]]:
    """kl_weight 0: the task reward's policy gradient alone (plain on-policy RL), in the estimator's form, with
    log p_S at the rollout's temperature (the policy that sampled)."""
    behaviour = responses.logprobs if config.objective.estimator == "sampled" else None
    logprobs = student.logprobs(actions, config.rollout.temperature or 1.0)
    per_token = policy_gradient_loss(logprobs, weighted_advantage(responses, config), behaviour)
    loss = masked_mean(per_token, responses.mask)
    return loss, {"policy_gradient": loss.item()}


@LOSSES.register(NLL)
def nll_loss(student: Scores, teacher: None, actions: Tensor, responses: Rollout,
             config: Config) -> tuple[Tensor, dict[str, float]]:
    loss = student.nll(actions, responses.mask)
    return loss, {"nll": loss.item()}


@dataclass(frozen=True)
class Plan:
    """What every micro-batch of a run does, resolved once from its config (`Plan.of`), not per micro-batch: the
    objective's row of mmopd/step/objective_table.py, what the teacher supplies, how responses are sampled and the
    row's loss, bound to its settings."""

    row: Row
    need: TeacherNeed  # what the teacher's scorer returns (unused where the row's teacher scores nothing)
    sampling: Sampling
    loss: BoundLoss  # the row's loss with the objective's settings
    samples_per_prompt: int
    lmbda: float  # gkd: the probability of the student's own samples
    sft_weight: float
    rollout: RolloutConfig  # an engine's log-probs are checked against the trainer's at its temperature
    reward: Reward | None = None  # objective.reward, resolved: (adapter, records, responses) -> rewards
    reward_name: str = ""  # as the config names it, for messages

    @classmethod
    def of(cls, config: Config) -> "Plan":
        obj = config.objective
        row = row_of(obj.kind, obj.estimator, obj.kl_weight)
        reward = resolve_reward(obj.reward)[0] if obj.reward else None
        return cls(row, teacher_need(config), sampling_of(config), functools.partial(LOSSES[row.loss], config=config),
                   config.rollout.samples_per_prompt, obj.lmbda, obj.sft_weight, config.rollout, reward, obj.reward)


def objective_step(m: Models, records: list[dict], plan: Plan, generator: torch.Generator,
                   timer: Timer, backward: Callable[[Tensor], None]) -> dict[str, float]:
    """One micro-batch: build responses, score them, backpropagate the loss; return its metrics."""
    row = plan.row
    if row.responses != ANSWERS:
        records = [r for r in records for _ in range(plan.samples_per_prompt)]
    s_prompts = m.adapter.encode_prompts(records, m.policy.processor).to(m.device)
    t_prompts = m.teacher_prompts(records)
    engine = response_engine(m, row.responses, plan.lmbda, generator)

    with timer.phase("rollout"):  # 1. responses
        if engine is None:
            responses = answers(m, records)
        else:
            responses = engine.sample(t_prompts if engine is m.teacher_rollout else s_prompts, plan.sampling,
                                      generator)
    actions = m.policy.space.to_actions(responses.tokens)  # [B, T]
    metrics = response_metrics(m, engine, responses, timer, plan.rollout.max_new_tokens)
    responses = rewarded(m, plan, records, responses, metrics, timer)  # their task rewards, where the plan has one

    with timer.phase("teacher"):  # 2. the teacher scores the same tokens
        t_scores = m.scorer.score(t_prompts, responses.tokens, plan.need) if row.teacher else None
    if row.teacher:
        metrics["teacher_tokens_per_s"] = metrics["response_tokens"] / max(timer.last["teacher"], 1e-9)

    with timer.phase("student"):  # 3. the per-token divergence (or NLL), 4. the update's gradients
        s_scores = model_scores(m.adapter, m.student, s_prompts, responses.tokens, m.policy.space, m.fused)
        if engine is not None and not engine.exact:  # another program sampled: measure, correct if asked
            responses = against_trainer(s_scores, actions, responses, plan.rollout, metrics)
        loss, values = plan.loss(s_scores, t_scores, actions, responses)
        metrics.update(values)
        metrics.update(m.teacher_divergences(records, functools.partial(plan.loss, s_scores, t_scores, actions),
                                             responses))
        if plan.sft_weight > 0:
            targets = answers(m, records)
            a_scores = model_scores(m.adapter, m.student, s_prompts, targets.tokens, m.policy.space, m.fused)
            nll = a_scores.nll(m.policy.space.to_actions(targets.tokens), targets.mask)
            loss = loss + plan.sft_weight * nll
            metrics["sft_nll"] = nll.item()
        backward(loss)
    metrics["loss"] = loss.item()
    return metrics


def rewarded(m: Models, plan: Plan, records: list[dict], responses: Rollout, metrics: dict[str, float],
             timer: Timer) -> Rollout:
    """The responses with their task rewards (the plan's reward on the texts the adapter decodes with the student's
    processor) and their metrics (`reward/mean`, `reward/std`, `reward/all_equal_share`, `time/reward`); as they
    are without one."""
    if plan.reward is None:
        return responses
    with timer.phase("reward"):
        texts = m.adapter.decode(responses.tokens, responses.mask, m.policy.processor)
        rewards = rewards_of(plan.reward, plan.reward_name, m.adapter, records, texts, m.device)
    metrics.update(reward_metrics(rewards, plan.samples_per_prompt))
    return replace(responses, rewards=rewards)


def response_metrics(m: Models, engine: RolloutEngine | None, responses: Rollout, timer: Timer,
                     max_new_tokens: int) -> dict[str, float]:
    """What a step logs about its responses: their count, length and sampling speed, and on the student's own
    samples their health (mmopd/step/health.py), whichever engine sampled them."""
    metrics = {"on_policy": float(engine is m.rollout), "response_tokens": responses.mask.sum().item(),
               "response_len": responses.mask.sum(1).mean().item(), "fused": float(m.fused)}
    if engine is m.rollout:  # the student's own samples: are they collapsing?
        metrics.update(sample_health(responses.tokens, responses.mask, responses.logprobs, max_new_tokens))
    if engine is not None:
        metrics["rollout_tokens_per_s"] = metrics["response_tokens"] / max(timer.last["rollout"], 1e-9)
    return metrics


def teacher_sample_entropy(m: Models, records: list[dict], plan: Plan, generator: torch.Generator) -> float:
    """The teacher's own samples' `health/token_entropy`: as many responses to `records` as a step of the student
    makes (samples_per_prompt each), at the plan's sampling, so that the two pooled entropies compare."""
    records = [r for r in records for _ in range(plan.samples_per_prompt)]
    responses = m.teacher_rollout.sample(m.teacher_prompts(records), plan.sampling, generator)
    return token_entropy(responses.tokens, responses.mask)


def against_trainer(student: Scores, actions: Tensor, responses: Rollout, rollout: RolloutConfig,
                    metrics: dict[str, float]) -> Rollout:
    """Responses sampled by an engine with its own numerics: log the mismatch of its behaviour log-probs with the
    trainer's on the sampled tokens, and return the behaviour log-probs the sampled estimator should use.

    `rollout/logprob_mismatch` is mean |log p_engine − log p_trainer| and `rollout/kl` the k3 estimate of
    KL(engine ‖ trainer), mean(r − 1 − log r) with r = p_trainer / p_engine. Without correction
    (`rollout.tis_cap: 0`) the behaviour is the trainer's own log-prob, as with the in-process engine; with a
    cap C the estimator's ratio is multiplied by min(p_trainer / p_engine, C), truncated importance sampling."""
    with torch.no_grad():
        trainer = student.logprobs(actions, rollout.temperature or 1.0).detach()  # [B, T]
    log_ratio = (trainer - responses.logprobs) * responses.mask
    metrics["rollout/logprob_mismatch"] = masked_mean(log_ratio.abs(), responses.mask).item()
    metrics["rollout/kl"] = masked_mean(log_ratio.exp() - 1 - log_ratio, responses.mask).item()
    behaviour = trainer
    if rollout.tis_cap > 0:
        behaviour = trainer - torch.clamp(log_ratio, max=math.log(rollout.tis_cap))
    return replace(responses, logprobs=behaviour * responses.mask)


def check_engine(m: Models, records: list[dict], config: Config) -> float:
    """Refuse to start when the rollout engine does not sample from the trainer's weights: the mean log-prob
    mismatch on a few sampled responses must stay under 1e-3 nats in float32 (5e-2 under bf16, whose
    rounding differs between engine and trainer). Returns the mismatch."""
    prompts = m.adapter.encode_prompts(records, m.policy.processor).to(m.device)
    responses = m.rollout.sample(prompts, Sampling(temperature=1.0), torch.Generator(m.device).manual_seed(0))
    with torch.no_grad():
        scores = model_scores(m.adapter, m.policy.model, prompts, responses.tokens, m.policy.space, m.fused)
        metrics: dict[str, float] = {}
        against_trainer(scores, m.policy.space.to_actions(responses.tokens), responses, replace(config.rollout,
                        temperature=1.0), metrics)
    mismatch = metrics["rollout/logprob_mismatch"]
    fp32 = next(m.policy.model.parameters()).dtype == torch.float32
    limit = 1e-3 if fp32 and not torch.cuda.is_available() else 5e-2
    if mismatch > limit:
        likeliest = (f". The likeliest cause: the server at {config.rollout.url} was started without --logprobs-mode "
                     "processed_logprobs, which `mmopd serve rollout CONFIG` passes (as does the command that "
                     "`mmopd vllm-checkpoint` prints), so it sends the raw model's log-probs, before the allowed-token "
                     "mask; else it serves another checkpoint or dtype") if config.rollout.url \
            else " (a server started from another checkpoint, another dtype?)"
        raise EngineError(f"the rollout engine's log-probs differ from the trainer's by {mismatch:.3g} nats a token "
                          f"(limit {limit:g}) before step 1: it does not serve the student's weights, vocabulary "
                          f"or numerics{likeliest}")
    return mismatch


def response_engine(m: Models, responses: str, lmbda: float, generator: torch.Generator) -> RolloutEngine | None:
    """The engine that samples this micro-batch's responses (per the row's `responses`), or None for the dataset
    answers. gkd draws once per micro-batch: the student's samples with probability λ."""
    if responses == TEACHER:
        return m.teacher_rollout
    if responses == ANSWERS:
        return None
    if responses == STUDENT_OR_ANSWERS and torch.rand((), generator=generator, device=generator.device).item() >= lmbda:
        return None
    return m.rollout


def answers(m: Models, records: list[dict]) -> Rollout:
    """The records' dataset answers as the student's response tokens."""
    return answers_rollout(m.adapter.encode_answers(records, m.policy.processor), m.policy.pad_id, m.device)
