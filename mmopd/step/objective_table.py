"""The objectives table: for each `objective.kind` (and estimator), where the responses come from, what the
teacher must supply and which loss applies. Everything else about an objective is derived from its row.

| kind, estimator          | responses from                              | teacher supplies | loss       |
|--------------------------|---------------------------------------------|------------------|------------|
| on_policy, full          | the student's rollout engine                | distribution     | divergence |
| on_policy, sampled       | the student's rollout engine                | token log-probs  | sampled    |
| gkd, full                | the student with probability λ, else answers | distribution     | divergence |
| supervised_kd, full      | dataset answers                             | distribution     | divergence |
| seq_kd, full             | the teacher's rollout engine                | nothing (samples)| nll        |
| sft, full                | dataset answers                             | nothing          | nll        |

| on_policy, kl_weight 0   | the student's rollout engine                | nothing          | policy_gradient |

"distribution" is the teacher's full distribution over the action space, or its top-k when `teacher.top_k`
is set. `objective.sft_weight > 0` adds the answers' NLL to any row.

`objective.kl_weight: 0` (on_policy with a task reward, `objective.reward`) turns the KL term off: no teacher is
loaded or asked for anything, and the loss is the reward's policy gradient alone, plain on-policy RL (either
estimator: without the KL term they are one loss). With kl_weight > 0 the reward enters the on_policy rows' own
losses (`divergence`, `sampled`), beside the KL.
"""

from __future__ import annotations

from dataclasses import dataclass

STUDENT, TEACHER, ANSWERS, STUDENT_OR_ANSWERS = "student", "teacher", "answers", "student_or_answers"
DISTRIBUTION, TOKEN_LOGPROBS = "distribution", "token_logprobs"
DIVERGENCE, SAMPLED, NLL, POLICY_GRADIENT = "divergence", "sampled", "nll", "policy_gradient"


@dataclass(frozen=True)
class Row:
    responses: str  # STUDENT | TEACHER | ANSWERS | STUDENT_OR_ANSWERS
    teacher: str | None  # DISTRIBUTION | TOKEN_LOGPROBS | None: the teacher scores nothing
    loss: str  # DIVERGENCE | SAMPLED | NLL | POLICY_GRADIENT


TABLE: dict[tuple[str, str], Row] = {
    ("on_policy", "full"): Row(STUDENT, DISTRIBUTION, DIVERGENCE),
    ("on_policy", "sampled"): Row(STUDENT, TOKEN_LOGPROBS, SAMPLED),
    ("gkd", "full"): Row(STUDENT_OR_ANSWERS, DISTRIBUTION, DIVERGENCE),
    ("supervised_kd", "full"): Row(ANSWERS, DISTRIBUTION, DIVERGENCE),
    ("seq_kd", "full"): Row(TEACHER, None, NLL),
    ("sft", "full"): Row(ANSWERS, None, NLL),
}
REWARD_ONLY = Row(STUDENT, None, POLICY_GRADIENT)  # on_policy with objective.kl_weight 0: plain on-policy RL
KINDS = tuple(dict.fromkeys(kind for kind, _ in TABLE))


def estimators_of(kind: str) -> tuple[str, ...]:
    return tuple(estimator for k, estimator in TABLE if k == kind)


def row_of(kind: str, estimator: str, kl_weight: float = 1.0) -> Row:
    """The row of a validated objective (config validation refuses pairs the table lacks, and kl_weight 0 outside
    on_policy)."""
    return REWARD_ONLY if kl_weight == 0 else TABLE[(kind, estimator)]


def needs_teacher(kind: str, estimator: str, kl_weight: float = 1.0) -> bool:
    """Whether the run loads a teacher: to score responses, or to sample them."""
    row = row_of(kind, estimator, kl_weight)
    return row.teacher is not None or row.responses == TEACHER


def scores_teacher(kind: str, estimator: str, kl_weight: float = 1.0) -> bool:
    """Whether the teacher scores the responses (seq_kd's teacher only samples them)."""
    return row_of(kind, estimator, kl_weight).teacher is not None


def needs_answers(kind: str, estimator: str, lmbda: float, sft_weight: float,
                  reward_reads_answers: bool = False) -> bool:
    """Whether every training record needs a dataset answer (`reward_reads_answers`: a reward such as exact_match)."""
    responses = row_of(kind, estimator).responses
    return (responses == ANSWERS or (responses == STUDENT_OR_ANSWERS and lmbda < 1) or sft_weight > 0
            or reward_reads_answers)
