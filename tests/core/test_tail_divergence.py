"""The top-k + tail divergence (`mmopd.losses.tail`) against a brute-force K+1-class divergence from full logits,
through the student's Logits and Hidden forms, and its lower-bound property."""

from __future__ import annotations

import pytest
import torch

from mmopd.losses import DIVERGENCES, token_divergence
from mmopd.step.scores import Hidden, Logits, TopKTail

B, T, A, H, K = 2, 3, 11, 8, 4


def _brute_force(student_logits, teacher_logits, ids, keep, kind, beta):
    """Merge every class outside the kept ids into one, for both, and take the divergence of the K+1 classes."""
    s, t = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)  # [B, T, A]
    values = []
    for b in range(B):
        for p in range(T):
            inside = [int(i) for i, k in zip(ids[b, p], keep[b, p]) if k]
            outside = [j for j in range(A) if j not in inside]
            def classes(lp):
                cls = [lp[b, p, i] if k else torch.tensor(float("-inf")) for i, k in zip(ids[b, p], keep[b, p])]
                return torch.stack(cls + [torch.logsumexp(lp[b, p, outside], 0)])
            values.append(token_divergence(classes(s), classes(t), kind, beta))
    return torch.stack(values).view(B, T)


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(A, H, generator=g)
    teacher_logits = 2 * torch.randn(B, T, A, generator=g)
    top = teacher_logits.log_softmax(-1).topk(K, dim=-1)
    keep = torch.ones(B, T, K, dtype=torch.bool)
    keep[0, 1, 2] = False  # an id outside the action space: its mass is in the teacher's tail
    teacher = TopKTail(top.values.masked_fill(~keep, float("-inf")), top.indices.masked_fill(~keep, 0))
    return hidden, weight, teacher_logits, teacher, keep, top.indices


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_tail_matches_the_brute_force_k_plus_1_class_divergence(kind):
    hidden, weight, teacher_logits, teacher, keep, ids = _case()
    mask = torch.ones(B, T)
    expected = _brute_force(hidden @ weight.t(), teacher_logits, ids, keep, kind, 0.3).mean()
    logits = Logits(hidden @ weight.t())
    fused = Hidden(hidden, weight, None)
    for scores in (logits, fused):
        got = scores.divergence(teacher, mask, kind, 0.3, 1.0)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_topk_tail_gradients_through_hidden_equal_those_through_logits(kind):
    hidden, weight, _, teacher, _, _ = _case(1)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    grads = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        scores = Hidden(h, w, None) if fused else Logits(h @ w.t())
        scores.divergence(teacher, mask, kind, 0.5, 1.0).backward()
        grads.append((h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_topk_tail_is_a_lower_bound_on_the_exact_divergence():
    hidden, weight, teacher_logits, teacher, _, _ = _case(2)
    student = hidden @ weight.t()
    exact = token_divergence(student, teacher_logits, "reverse_kl")  # [B, T]
    tail = torch.stack([Logits(student).divergence(teacher, torch.nn.functional.one_hot(torch.tensor(i), B * T)
                                                   .view(B, T).float(), "reverse_kl", 0.5, 1.0)
                        for i in range(B * T)]).view(B, T)
    assert (tail <= exact + 1e-6).all()


def test_topk_tail_is_exact_when_the_k_ids_cover_the_action_space():
    hidden, weight, teacher_logits, _, _, _ = _case(3)
    top = teacher_logits.log_softmax(-1).topk(A, dim=-1)
    teacher = TopKTail(top.values, top.indices)
    student = hidden @ weight.t()
    got = Hidden(hidden, weight, None).divergence(teacher, torch.ones(B, T), "forward_kl", 0.5, 1.0)
    torch.testing.assert_close(got, token_divergence(student, teacher_logits, "forward_kl").mean(),
                               atol=1e-5, rtol=1e-5)


def test_topk_tail_refuses_another_temperature():
    hidden, weight, _, teacher, _, _ = _case()
    with pytest.raises(ValueError, match="temperature-1"):
        Logits(hidden @ weight.t()).divergence(teacher, torch.ones(B, T), "reverse_kl", 0.5, 2.0)
