"""Fused divergences from hidden states equal token_divergence on the materialised logits, gradients included."""

from __future__ import annotations

import pytest
import torch

from mmopd.losses import (
    DIVERGENCES,
    fused_divergence_loss,
    fused_sampled_reverse_kl_loss,
    fused_token_divergence,
    fused_token_logprobs,
    sampled_reverse_kl_loss,
    sampled_token_logprobs,
    token_divergence,
)

N, H_S, H_T, V = 7, 5, 6, 11
CASES = [(kind, 0.5) for kind in DIVERGENCES] + [("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]


def _heads(seed: int = 0, bias: bool = True, dtype: torch.dtype = torch.float64):
    """Student hidden/weight/bias that require grad, and a detached teacher, with sharp-ish distributions."""
    g = torch.Generator().manual_seed(seed)
    s_hidden = (2 * torch.randn(N, H_S, generator=g, dtype=dtype)).requires_grad_()
    s_weight = torch.randn(V, H_S, generator=g, dtype=dtype).requires_grad_()
    s_bias = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    t_hidden = 2 * torch.randn(N, H_T, generator=g, dtype=dtype)
    t_weight = torch.randn(V, H_T, generator=g, dtype=dtype)
    t_bias = torch.randn(V, generator=g, dtype=dtype) if bias else None
    return s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias


def _logits(hidden, weight, bias):
    return torch.nn.functional.linear(hidden, weight, bias)


def _weights(n: int) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, n, dtype=torch.float64)


def _values_and_grads(values_fn, tensors, loss_fn=None):
    """Per-token values and the gradient of Σ w·values w.r.t. each tensor (every token weighted differently).
    `loss_fn(weights) -> (loss, values)` computes the weighted sum itself (the fused loss form)."""
    if loss_fn is None:
        values = values_fn()
        loss = (values.double() * _weights(values.numel()).view(values.shape)).sum()
    else:
        loss, values = loss_fn(_weights(N))
    grads = torch.autograd.grad(loss, [t for t in tensors if t is not None])
    return values.detach(), grads


def _assert_fused_matches_logits(kind, beta, temperature=1.0, chunk_size=None, bias=True, space=None,
                                 teacher_floor=None, loss_form=False):
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = _heads(bias=bias)
    if space is not None:  # an action space: a subset of the head's rows
        pick = lambda w: None if w is None else w.index_select(0, space)  # noqa: E731
    else:
        pick = lambda w: w  # noqa: E731
    t_logits_full = _logits(t_hidden, t_weight, t_bias)
    forbid = None
    if teacher_floor is not None:  # the teacher forbids some tokens: -inf logits through a -inf bias
        forbid = torch.zeros(t_weight.shape[0], dtype=torch.float64)
        forbid[teacher_floor] = float("-inf")
        t_bias = (t_bias if t_bias is not None else torch.zeros_like(forbid)) + forbid
        t_logits_full = _logits(t_hidden, t_weight, t_bias)
    tensors = [s_hidden, s_weight, s_bias]

    def reference():
        s_logits = _logits(s_hidden, pick(s_weight), pick(s_bias))
        return token_divergence(s_logits, pick(t_logits_full.T).T if space is not None else t_logits_full,
                                kind, beta, temperature, chunk_size=0)

    def fused():
        return fused_token_divergence(s_hidden, pick(s_weight), t_hidden, pick(t_weight), kind, beta, temperature,
                                      student_bias=pick(s_bias), teacher_bias=pick(t_bias), chunk_size=chunk_size)

    def fused_loss(weights):
        return fused_divergence_loss(s_hidden, pick(s_weight), t_hidden, pick(t_weight), weights, kind, beta,
                                     temperature, student_bias=pick(s_bias), teacher_bias=pick(t_bias),
                                     chunk_size=chunk_size)

    expected, expected_grads = _values_and_grads(reference, tensors)
    got, got_grads = _values_and_grads(fused, tensors, fused_loss if loss_form else None)
    assert got.dtype == torch.float32 and got.shape == (N,)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,beta", CASES)
def test_fused_values_and_student_grads_match_token_divergence_on_logits(kind, beta):
    _assert_fused_matches_logits(kind, beta)


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("chunk_size,temperature", [(None, 1.0), (3, 0.5), (1, 2.0)])
def test_fused_loss_form_gives_the_weighted_sum_and_its_grads_without_recompute(kind, beta, chunk_size, temperature):
    _assert_fused_matches_logits(kind, beta, temperature=temperature, chunk_size=chunk_size, loss_form=True)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_fused_loss_form_over_an_action_space_with_teacher_forbidden_tokens(kind):
    _assert_fused_matches_logits(kind, 0.5, space=torch.tensor([9, 0, 4, 5, 2, 7, 1, 3]), teacher_floor=[1, 3],
                                 chunk_size=4, loss_form=True)


def test_fused_loss_form_skips_gradients_nobody_asks_for():
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = _heads()
    s_weight.requires_grad_(False)  # a frozen head (LoRA students): no [V, H] gradient is built
    loss, values = fused_divergence_loss(s_hidden, s_weight, t_hidden, t_weight, torch.ones(N), "jsd")
    assert not values.requires_grad and loss.requires_grad
    loss.backward()
    assert s_hidden.grad is not None and s_weight.grad is None
    with torch.no_grad():
        loss, _ = fused_divergence_loss(s_hidden, s_weight, t_hidden, t_weight, torch.ones(N))
    assert loss.grad_fn is None


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_fused_temperature_matches(kind, beta, temperature):
    _assert_fused_matches_logits(kind, beta, temperature=temperature)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 0])
def test_fused_chunking_that_does_not_divide_n_is_exact(kind, chunk_size):
    _assert_fused_matches_logits(kind, 0.5, chunk_size=chunk_size)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_fused_without_bias_matches(kind):
    _assert_fused_matches_logits(kind, 0.5, bias=False)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_fused_over_an_action_space_that_is_a_subset_of_the_head_rows(kind):
    _assert_fused_matches_logits(kind, 0.5, space=torch.tensor([9, 0, 4, 5, 2, 7]), chunk_size=3)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_fused_with_teacher_forbidden_tokens_matches_the_floored_logits_path(kind):
    _assert_fused_matches_logits(kind, 0.5, teacher_floor=[1, 3, 8], chunk_size=4)


def test_fused_keeps_input_dtypes_for_grads_in_bfloat16():
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = (
        None if x is None else x.detach().bfloat16().requires_grad_(x.requires_grad) for x in _heads())
    values = fused_token_divergence(s_hidden, s_weight, t_hidden, t_weight, "jsd", student_bias=s_bias,
                                    teacher_bias=t_bias, chunk_size=2)
    values.sum().backward()
    assert values.dtype == torch.float32
    assert s_hidden.grad.dtype == s_weight.grad.dtype == s_bias.grad.dtype == torch.bfloat16
    reference = token_divergence(_logits(s_hidden, s_weight, s_bias), _logits(t_hidden, t_weight, t_bias), "jsd")
    torch.testing.assert_close(values, reference.detach(), rtol=2e-2, atol=2e-2)


def test_fused_backward_saves_only_the_inputs_never_an_n_by_v_tensor():
    inputs = _heads()
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = inputs
        values = fused_token_divergence(s_hidden, s_weight, t_hidden, t_weight, student_bias=s_bias,
                                        teacher_bias=t_bias, chunk_size=2)
    pointers = {x.data_ptr() for x in inputs if x is not None}
    assert saved and all(x.data_ptr() in pointers for x in saved)  # the inputs (or views of them)
    assert not any(x.shape == (N, V) for x in saved)
    values.sum().backward()


def test_fused_refuses_a_teacher_that_requires_grad_and_mismatched_shapes():
    s_hidden, s_weight, _, t_hidden, t_weight, _ = _heads()
    with pytest.raises(ValueError, match="teacher side"):
        fused_token_divergence(s_hidden, s_weight, t_hidden, t_weight.clone().requires_grad_())
    with pytest.raises(ValueError, match="share H"):
        fused_token_divergence(s_hidden, s_weight[:, :3], t_hidden, t_weight)
    with pytest.raises(ValueError, match="same positions"):
        fused_token_divergence(s_hidden[:3], s_weight, t_hidden, t_weight)


@pytest.mark.parametrize("temperature,chunk_size", [(1.0, None), (0.7, 3), (2.0, 1)])
def test_fused_token_logprobs_match_sampled_token_logprobs_with_grads(temperature, chunk_size):
    s_hidden, s_weight, s_bias, *_ = _heads(seed=3)
    tokens = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    tensors = [s_hidden, s_weight, s_bias]
    expected, expected_grads = _values_and_grads(
        lambda: sampled_token_logprobs(_logits(s_hidden, s_weight, s_bias), tokens, temperature), tensors)
    got, got_grads = _values_and_grads(
        lambda: fused_token_logprobs(s_hidden, s_weight, tokens, temperature, bias=s_bias, chunk_size=chunk_size),
        tensors)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_fused_accepts_leading_batch_dimensions():
    s_hidden, s_weight, _, t_hidden, t_weight, _ = _heads()
    values = fused_token_divergence(s_hidden[:6].view(2, 3, H_S), s_weight, t_hidden[:6].view(2, 3, H_T), t_weight)
    assert values.shape == (2, 3)
    torch.testing.assert_close(values.flatten(),
                               fused_token_divergence(s_hidden[:6], s_weight, t_hidden[:6], t_weight).detach())


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_under_autocast_the_head_matmuls_run_in_the_autocast_dtype_like_the_models_lm_head(kind):
    """fp32 master weights under bf16 autocast: the fused loss is as close to the fp32 result as the autocast
    logits path is, and the gradients come back in fp32."""
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = (
        None if x is None else x.detach().float().requires_grad_(x.requires_grad) for x in _heads())
    tensors = (s_hidden, s_weight, s_bias)

    def logits_path():
        return token_divergence(_logits(s_hidden, s_weight, s_bias), _logits(t_hidden, t_weight, t_bias), kind).mean()

    exact = torch.autograd.grad(logits_path(), tensors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _logits(s_hidden, s_weight, s_bias).dtype == torch.bfloat16  # what autocast does to lm_head
        reference = torch.autograd.grad(logits_path(), tensors)
        loss, _ = fused_divergence_loss(s_hidden, s_weight, t_hidden, t_weight, torch.full((N,), 1.0 / N), kind,
                                        student_bias=s_bias, teacher_bias=t_bias, chunk_size=3)
    got = torch.autograd.grad(loss, tensors)
    for g, r, e in zip(got, reference, exact):
        assert g.dtype == torch.float32
        assert (g - e).norm() <= 2 * (r - e).norm() + 1e-3 * e.norm(), ((g - e).norm(), (r - e).norm())
        assert (g - e).norm() > 0  # the fused matmuls did run in bf16


@pytest.mark.parametrize("off_policy", [False, True])
@pytest.mark.parametrize("temperature,chunk_size", [(1.0, None), (0.7, 3)])
def test_fused_sampled_loss_equals_the_weighted_sampled_estimator_on_logits(off_policy, temperature, chunk_size):
    s_hidden, s_weight, s_bias, *_ = _heads(seed=5)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, V, (N,), generator=g)
    teacher_lp = torch.log_softmax(torch.randn(N, V, generator=g), -1).gather(-1, tokens[:, None]).squeeze(-1)
    teacher_lp[2] = float("-inf")  # a token the teacher forbids: floored, never NaN
    behaviour = (torch.randn(N, generator=g) - 2.0) if off_policy else None
    weights = _weights(N).float()
    tensors = (s_hidden, s_weight, s_bias)

    s_lp = sampled_token_logprobs(_logits(s_hidden, s_weight, s_bias), tokens, temperature)
    per_token, kl_expected = sampled_reverse_kl_loss(s_lp, teacher_lp, behaviour)
    expected = (per_token * weights).sum()
    expected_grads = torch.autograd.grad(expected, tensors)
    loss, kl = fused_sampled_reverse_kl_loss(s_hidden, s_weight, tokens, teacher_lp, weights, behaviour,
                                             temperature, bias=s_bias, chunk_size=chunk_size)
    got_grads = torch.autograd.grad(loss, tensors)
    assert torch.isfinite(loss) and not kl.requires_grad
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kl, kl_expected, rtol=1e-5, atol=1e-4)
    for got, want in zip(got_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
