"""Each Scores form answers what it can and refuses what it cannot, naming itself."""

from __future__ import annotations

import pytest
import torch

from mmopd.losses import Shaping, masked_mean, token_divergence, topk_token_divergence
from mmopd.step.batch import Rollout
from mmopd.step.scores import Hidden, Logits, TokenLogprobs, TopK


def _pair():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 3, 8, generator=g), torch.randn(11, 8, generator=g)
    t_hidden, t_weight = torch.randn(2, 3, 8, generator=g), torch.randn(11, 8, generator=g)
    return hidden, weight, t_hidden, t_weight


def test_hidden_and_logits_give_the_same_divergence_logprobs_and_sampled_loss():
    hidden, weight, t_hidden, t_weight = _pair()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    fused, plain = Hidden(hidden, weight, None), Logits(hidden @ weight.T)
    t_fused, t_plain = Hidden(t_hidden, t_weight, None), Logits(t_hidden @ t_weight.T)
    args = ("jsd", 0.3, 0.9)
    torch.testing.assert_close(fused.divergence(t_fused, mask, *args), plain.divergence(t_plain, mask, *args))
    actions = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.testing.assert_close(fused.logprobs(actions, 0.9), plain.logprobs(actions, 0.9))
    teacher = TokenLogprobs(t_plain.logprobs(actions))
    responses = Rollout(actions, mask, plain.logprobs(actions).detach())
    for got, want in zip(fused.sampled_loss(teacher, actions, responses, 1.0),
                         plain.sampled_loss(teacher, actions, responses, 1.0)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shaping", [Shaping(baseline="loo", group=2), Shaping(baseline="batch"), Shaping(clip=0.5),
                                     Shaping(kl="k3")])
def test_hidden_and_logits_give_the_same_shaped_sampled_loss_and_gradient(shaping):
    hidden, weight, t_hidden, t_weight = _pair()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    actions = torch.tensor([[1, 2, 3], [4, 5, 6]])
    teacher = TokenLogprobs(Logits(t_hidden @ t_weight.T).logprobs(actions))
    grads = []
    for form in (lambda h: Hidden(h, weight, None), lambda h: Logits(h @ weight.T)):
        h = hidden.clone().requires_grad_(True)
        scores = form(h)
        responses = Rollout(actions, mask, scores.logprobs(actions).detach())
        loss, _ = scores.sampled_loss(teacher, actions, responses, 1.0, shaping)
        loss.backward()
        grads.append((loss.detach(), h.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_a_topk_teacher_is_compared_over_its_k_ids_from_logits_and_from_hidden_states():
    hidden, weight, t_hidden, t_weight = _pair()
    mask = torch.ones(2, 3)
    values, ids = (t_hidden @ t_weight.T).topk(4, dim=-1)
    teacher = TopK(values, ids)
    expected = masked_mean(topk_token_divergence(hidden @ weight.T, values, ids), mask)
    torch.testing.assert_close(Logits(hidden @ weight.T).divergence(teacher, mask, "reverse_kl", 0.5, 1.0), expected)
    torch.testing.assert_close(Hidden(hidden, weight, None).divergence(teacher, mask, "reverse_kl", 0.5, 1.0),
                               expected)
    full = masked_mean(token_divergence(hidden @ weight.T, t_hidden @ t_weight.T), mask)
    assert not torch.allclose(expected, full)  # top-k is its own (biased) quantity


def test_forms_refuse_what_they_cannot_answer():
    hidden, weight, _, _ = _pair()
    actions, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
    with pytest.raises(TypeError, match="TopK scores cannot give log-probs"):
        TopK(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long)).logprobs(actions)
    with pytest.raises(TypeError, match="TokenLogprobs scores cannot be a student's side of a divergence"):
        TokenLogprobs(torch.zeros(2, 3)).divergence(Logits(torch.zeros(2, 3, 11)), mask, "reverse_kl", 0.5, 1.0)
    with pytest.raises(TypeError, match="a student's Logits cannot be compared with a teacher's TokenLogprobs"):
        Logits(hidden @ weight.T).divergence(TokenLogprobs(torch.zeros(2, 3)), mask, "reverse_kl", 0.5, 1.0)
    with pytest.raises(TypeError, match="Hidden scores cannot be compared with a teacher's Logits"):
        Hidden(hidden, weight, None).divergence(Logits(hidden @ weight.T), mask, "reverse_kl", 0.5, 1.0)
