"""Specification of the shaped sampled estimator (mmopd.losses.shaped_sampled_loss): what each shaping's gradient
equals in expectation, computed exactly by enumerating every sampled token (or pair of tokens) of a tiny
vocabulary, against the exact reverse- and forward-KL gradients."""

import itertools

import pytest
import torch

from mmopd.config import ConfigError, load_config
from mmopd.losses import Shaping, leave_one_out_mean, shaped_sampled_loss

torch.set_num_threads(1)

V = 4


def models(seed=0, scale=1.5):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(V, generator=gen, dtype=torch.float64),
            scale * torch.randn(V, generator=gen, dtype=torch.float64))


def exact_gradient(student, teacher, direction):
    """∇_z KL(S‖T) ("reverse") or ∇_z KL(T‖S) ("forward") at the student's logits z, in float64."""
    z = student.clone().requires_grad_(True)
    log_s, log_t = torch.log_softmax(z, -1), torch.log_softmax(teacher, -1)
    kl = (log_s.exp() * (log_s - log_t)).sum() if direction == "reverse" else (log_t.exp() * (log_t - log_s)).sum()
    kl.backward()
    return z.grad


def expected_gradient(student, teacher, shaping, group=1):
    """E over every group of `group` tokens drawn from the student of the group's mean per-token gradient:
    the enumeration of all V**group draws, each weighted by its probability (no Monte Carlo)."""
    draws = torch.tensor(list(itertools.product(range(V), repeat=group)))  # [D, group]
    z = student.clone().requires_grad_(True)
    log_s = torch.log_softmax(z, -1)
    log_t = torch.log_softmax(teacher, -1)
    tokens = draws.reshape(-1, 1)  # [D·group, 1]: one position per row, a group's rows consecutive
    student_lp = log_s[tokens]  # [D·group, 1]
    loss, _ = shaped_sampled_loss(student_lp, log_t[tokens], torch.ones_like(student_lp), shaping)
    probability = log_s.detach()[draws].sum(1).exp()  # [D]
    (probability * loss.view(-1, group).double().mean(1)).sum().backward()
    return z.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_k1_gradient_is_the_reverse_kl_gradient_in_expectation(seed):
    student, teacher = models(seed)
    torch.testing.assert_close(expected_gradient(student, teacher, Shaping()),
                               exact_gradient(student, teacher, "reverse"))


@pytest.mark.parametrize("group", [2, 3])
def test_leave_one_out_baseline_keeps_the_reverse_kl_gradient_unbiased(group):
    student, teacher = models(3)
    got = expected_gradient(student, teacher, Shaping(baseline="loo", group=group), group)
    torch.testing.assert_close(got, exact_gradient(student, teacher, "reverse"))


def test_batch_baseline_over_rows_of_other_prompts_keeps_the_gradient_unbiased():
    (s1, t1), (s2, t2) = models(7), models(8)  # two prompts: each row its own student and teacher
    z = torch.stack([s1, s2]).requires_grad_(True)  # [2, V]
    log_s, log_t = torch.log_softmax(z, -1), torch.log_softmax(torch.stack([t1, t2]), -1)
    draws = torch.tensor(list(itertools.product(range(V), repeat=2)))  # [D, 2]: a token for each row
    rows = torch.arange(2).expand_as(draws)
    student_lp, teacher_lp = log_s[rows, draws].reshape(-1, 1), log_t[rows, draws].reshape(-1, 1)  # [2D, 1]
    loss = torch.stack([shaped_sampled_loss(student_lp[2 * d:2 * d + 2], teacher_lp[2 * d:2 * d + 2],
                                            torch.ones(2, 1), Shaping(baseline="batch"))[0].sum()
                        for d in range(len(draws))])  # [D]: each draw its own batch of two rows
    probability = log_s.detach()[rows, draws].sum(1).exp()  # [D]
    (probability * loss).sum().backward()
    torch.testing.assert_close(z.grad, torch.stack([exact_gradient(s1, t1, "reverse"), exact_gradient(s2, t2, "reverse")]),
                               rtol=1e-5, atol=1e-6)  # the losses are float32


def gradient_variance(student, teacher, shaping, group):
    """Σ_v Var of the mean gradient over a group of `group` draws, by enumerating every group."""
    draws = torch.tensor(list(itertools.product(range(V), repeat=group)))  # [D, G]
    log_s, log_t = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    probability = log_s[draws].sum(1).exp()  # [D]
    student_lp, teacher_lp = log_s[draws].reshape(-1, 1), log_t[draws].reshape(-1, 1)  # [D·G, 1]
    loss, _ = shaped_sampled_loss(student_lp, teacher_lp, torch.ones_like(student_lp), shaping)
    coefficient = loss.view(-1, group).double()  # on-policy ρ = 1: the loss is the coefficient c
    score = torch.nn.functional.one_hot(draws, V).double() - log_s.exp()  # [D, G, V] ∇_z log p_S(x)
    grads = (coefficient[..., None] * score).mean(1)  # [D, V] each group's gradient
    mean = (probability[:, None] * grads).sum(0)
    return float((probability[:, None] * (grads - mean) ** 2).sum())


def test_leave_one_out_baseline_halves_the_variance_against_a_peaked_teacher_but_not_everywhere():
    student = torch.tensor([1.0, 0.5, 0.0, -0.5], dtype=torch.float64)
    peaked = torch.tensor([10.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # like the text toy's teacher
    loo, plain = Shaping(baseline="loo", group=4), Shaping()
    assert gradient_variance(student, peaked, loo, 4) < 0.5 * gradient_variance(student, peaked, plain, 4)
    student, broad = models(0, scale=1.0)  # E[k] is a poor baseline when k and the score correlate
    assert gradient_variance(student, broad, loo, 4) > gradient_variance(student, broad, plain, 4)


def test_leave_one_out_mean_skips_rows_that_end_before_the_position():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0], [7.0, 8.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    torch.testing.assert_close(leave_one_out_mean(values, mask, 2),
                               torch.tensor([[3.0, 0.0], [1.0, 2.0], [7.0, 8.0], [5.0, 9.0]]))


def test_clipped_advantage_is_biased_where_the_clip_binds_and_exact_where_it_does_not():
    student, teacher = models(5, scale=3.0)
    k = torch.log_softmax(student, -1) - torch.log_softmax(teacher, -1)
    exact = exact_gradient(student, teacher, "reverse")
    loose = float(k.abs().max()) + 1
    torch.testing.assert_close(expected_gradient(student, teacher, Shaping(clip=loose)), exact)
    tight = expected_gradient(student, teacher, Shaping(clip=0.5))
    assert (tight - exact).abs().max() > 0.05  # the bias: E[clamp(k, −C, C)·∇log p_S] ≠ ∇KL(S‖T)
    p = torch.softmax(student, -1)
    score = torch.eye(V, dtype=torch.float64) - p  # [V, V] ∇_z log p_S(x) per token x
    torch.testing.assert_close(tight, (p * k.clamp(-0.5, 0.5)) @ score)


def test_k3_gradient_is_the_forward_kl_gradient_not_the_reverse_kl_gradient():
    student, teacher = models(6, scale=1.0)  # no clamp binds: |log p_T/p_S| < 20, k3 < 10
    got = expected_gradient(student, teacher, Shaping(kl="k3"))
    torch.testing.assert_close(got, exact_gradient(student, teacher, "forward"))
    reverse = exact_gradient(student, teacher, "reverse")
    assert (got - reverse).abs().max() > 0.1 * reverse.abs().max()


@pytest.mark.parametrize("overrides, message", [
    ({"objective.baseline": "loo"}, "samples_per_prompt >= 2"),
    ({"objective.estimator": "full", "objective.advantage_clip": 1.0}, "set objective.estimator=sampled"),
    ({"objective.sampled_kl": "k3", "objective.advantage_clip": 1.0}, "Use one or the other"),
    ({"objective.baseline": "mean"}, "objective.baseline"),
    ({"objective.advantage_clip": -1.0}, "objective.advantage_clip"),
])
def test_shaping_options_refuse_what_does_not_apply(overrides, message):
    base = {"student.path": "s", "teacher.path": "t", "data.train": "d.jsonl", "objective.estimator": "sampled"}
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**base, **overrides})
