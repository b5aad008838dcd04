"""Top-k teacher distributions: the divergence over the teacher's K ids with both sides renormalised there."""

from __future__ import annotations

import pytest
import torch

from mmopd.config import ConfigError
from mmopd.losses import DIVERGENCES, fused_gathered_logits, fused_topk_logits, token_divergence, topk_token_divergence

N, V = 6, 13


def _bruteforce_topk(student, teacher, k, kind, beta=0.5, temperature=1.0):
    """Per row: the teacher's top-k ids, softmax of both sides restricted to them, the divergence by its formula."""
    out = []
    for z_s, z_t in zip(student.double(), teacher.double()):
        ids = z_t.topk(k).indices
        p = torch.softmax(z_s[ids] / temperature, -1)
        q = torch.softmax(z_t[ids] / temperature, -1)
        if kind == "reverse_kl":
            out.append((p * (p.log() - q.log())).sum())
        elif kind == "forward_kl":
            out.append((q * (q.log() - p.log())).sum())
        elif kind == "jsd":
            m = beta * q + (1 - beta) * p
            out.append(beta * (q * (q.log() - m.log())).sum() + (1 - beta) * (p * (p.log() - m.log())).sum())
        else:
            out.append(0.5 * (p - q).abs().sum())
    return torch.stack(out)


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(N, V, generator=g, dtype=torch.float64)).requires_grad_(), \
        3 * torch.randn(N, V, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 2, 5, 12])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_topk_divergence_matches_the_bruteforce_renormalised_formula_with_grads(kind, k, temperature):
    student, teacher = _pair()
    top = teacher.topk(k, dim=-1)
    got = topk_token_divergence(student, top.values, top.indices, kind, 0.3, temperature)
    expected = _bruteforce_topk(student, teacher, k, kind, 0.3, temperature)
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    weights = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    (grad_got,) = torch.autograd.grad((got.double() * weights).sum(), student)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), student)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-4, atol=1e-6)
    outside = torch.ones_like(student, dtype=torch.bool).scatter_(-1, top.indices, False)
    assert (grad_got[outside] == 0).all()  # the student's mass outside the teacher's top-k is not seen


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_with_k_equal_to_the_vocabulary_is_the_exact_divergence(kind):
    student, teacher = _pair(1)
    top = teacher.topk(V, dim=-1)
    torch.testing.assert_close(topk_token_divergence(student, top.values, top.indices, kind),
                               token_divergence(student, teacher, kind), rtol=1e-5, atol=1e-6)


def test_topk_keeps_teacher_forbidden_ids_finite():
    student, teacher = _pair(2)
    teacher[:, 3:] = float("-inf")  # only 3 allowed ids, k = 5 takes two -inf entries
    top = teacher.topk(5, dim=-1)
    values = topk_token_divergence(student, top.values, top.indices, "forward_kl")
    p = torch.softmax(student.detach().gather(-1, top.indices), -1)  # the student over all 5 ids
    q = torch.softmax(top.values, -1)  # 0 on the two forbidden ids
    expected = torch.where(q > 0, q * (q.log() - p.log()), torch.zeros_like(q)).sum(-1)
    assert torch.isfinite(values).all()
    torch.testing.assert_close(values.double(), expected, rtol=1e-5, atol=1e-6)


def test_fused_topk_logits_equal_topk_of_the_materialised_logits():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 5, 4, generator=g), torch.randn(V, 4, generator=g)
    bias = torch.randn(V, generator=g)
    values, ids = fused_topk_logits(hidden, weight, 4, bias=bias, chunk_size=3)
    top = torch.nn.functional.linear(hidden, weight, bias).topk(4, dim=-1)
    assert values.shape == ids.shape == (2, 5, 4)
    torch.testing.assert_close(values, top.values)
    assert torch.equal(ids, top.indices)


def test_topk_shape_errors_and_config_checks(text_config):
    student, teacher = _pair()
    top = teacher.topk(3, dim=-1)
    with pytest.raises(ValueError, match="top-k logits and ids"):
        topk_token_divergence(student, top.values[:, :2], top.indices)
    with pytest.raises(ConfigError, match="teacher.top_k"):
        text_config(**{"teacher.top_k": 4, "objective.estimator": "sampled"})
    with pytest.raises(ConfigError, match="teacher.top_k must be >= 0"):
        text_config(**{"teacher.top_k": -1})
    with pytest.raises(ConfigError, match="objective.fused is 'yes'"):
        text_config(**{"objective.fused": "yes"})


def test_fused_gathered_logits_equal_gathering_the_logits_with_grads():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (2, 5, 3), generator=g)
    weights = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    expected = torch.nn.functional.linear(hidden, weight, bias).gather(-1, ids)
    grads_expected = torch.autograd.grad((expected * weights).sum(), (hidden, weight, bias))
    got = fused_gathered_logits(hidden, weight, ids, bias=bias, chunk_size=3)
    grads_got = torch.autograd.grad((got.double() * weights).sum(), (hidden, weight, bias))
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_got, grads_expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
