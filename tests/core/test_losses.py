"""Specification of mmopd.losses: divergences, the sampled-token estimator and masked_mean."""

import pytest
import torch

from mmopd.losses import (
    DIVERGENCES,
    masked_mean,
    sampled_reverse_kl_loss,
    sampled_token_logprobs,
    token_divergence,
)

torch.set_num_threads(1)

SHAPES = [(7, 5), (2, 3, 11), (1, 1, 2)]


def logits_pair(shape, seed=0, dtype=torch.float32, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    teacher = (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    return student, teacher


def bruteforce(student, teacher, kind, beta=0.5, temperature=1.0):
    """The textbook formulas in float64, vocabulary on the last dimension."""
    p_s = torch.softmax(student.double() / temperature, dim=-1)
    p_t = torch.softmax(teacher.double() / temperature, dim=-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return (p_s * (p_s.log() - p_t.log())).sum(-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return (p_t * (p_t.log() - p_s.log())).sum(-1)
    if kind == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        kl_t = (p_t * (p_t.log() - m.log())).sum(-1)
        kl_s = (p_s * (p_s.log() - m.log())).sum(-1)
        return beta * kl_t + (1 - beta) * kl_s
    return 0.5 * (p_s - p_t).abs().sum(-1)


def value_and_grads(fn, student, teacher, weights):
    """fn's value and the gradients of Σ weights·fn w.r.t. both logits."""
    student = student.detach().requires_grad_(True)
    teacher = teacher.detach().requires_grad_(True)
    value = fn(student, teacher)
    (value * weights.to(value.dtype)).sum().backward()
    return value.detach(), student.grad, teacher.grad


def check_against_bruteforce(shape, kind, beta=0.5, temperature=1.0):
    student, teacher = logits_pair(shape)
    weights = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(1))
    got = value_and_grads(
        lambda s, t: token_divergence(s, t, kind, beta=beta, temperature=temperature), student, teacher, weights
    )
    want = value_and_grads(
        lambda s, t: bruteforce(s, t, kind, beta=beta, temperature=temperature),
        student.double(),
        teacher.double(),
        weights,
    )
    assert got[0].dtype == torch.float32 and got[0].shape == shape[:-1]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_values_and_gradients_match_bruteforce(kind, shape):
    check_against_bruteforce(shape, kind)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_both_logits(kind, temperature):
    check_against_bruteforce((2, 3, 11), kind, temperature=temperature)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_interior_beta_matches_bruteforce(beta):
    check_against_bruteforce((2, 3, 11), "jsd", beta=beta)


@pytest.mark.parametrize("beta,kind", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_endpoints_are_the_kls(beta, kind):
    student, teacher = logits_pair((4, 9))
    weights = torch.ones(4)
    jsd = value_and_grads(lambda s, t: token_divergence(s, t, "jsd", beta=beta), student, teacher, weights)
    kl = value_and_grads(lambda s, t: token_divergence(s, t, kind), student, teacher, weights)
    for a, b in zip(jsd, kl):
        torch.testing.assert_close(a, b)
    assert (jsd[0] > 1e-3).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [1, 3, None, 0, 10_000])
def test_chunked_equals_unchunked(kind, chunk_size):
    student, teacher = logits_pair((3, 5, 13))
    weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(2))
    whole = value_and_grads(lambda s, t: token_divergence(s, t, kind, chunk_size=0), student, teacher, weights)
    chunked = value_and_grads(
        lambda s, t: token_divergence(s, t, kind, chunk_size=chunk_size), student, teacher, weights
    )
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b)


def test_automatic_chunk_size_bounds_a_chunk_to_2_pow_25_float32_elements():
    import mmopd.losses.chunks as losses

    assert losses.rows_per_chunk(10, 2**40, None) == 1
    assert losses.rows_per_chunk(10, 1000, None) * 1000 <= 2**25
    assert losses.rows_per_chunk(10, 1000, 0) == 10
    assert losses.rows_per_chunk(10, 1000, 4) == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_half_precision_inputs_give_float32_values_and_input_dtype_grads(kind, dtype):
    student, teacher = logits_pair((2, 3, 11))
    weights = torch.rand(2, 3, generator=torch.Generator().manual_seed(3))
    def fn(s, t):
        return token_divergence(s, t, kind)

    low = value_and_grads(fn, student.to(dtype), teacher.to(dtype), weights)
    upcast = value_and_grads(fn, student.to(dtype).float(), teacher.to(dtype).float(), weights)
    full = value_and_grads(fn, student, teacher, weights)
    assert low[0].dtype == torch.float32
    assert low[1].dtype == dtype and low[2].dtype == dtype
    torch.testing.assert_close(low[0], upcast[0])  # computed in float32 after the upcast
    for g_low, g_full in zip(low, full):
        torch.testing.assert_close(g_low.float(), g_full, rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_large_magnitude_logits_stay_finite(kind, dtype):
    gen = torch.Generator().manual_seed(4)
    signs = torch.randint(0, 2, (2, 4, 16), generator=gen) * 2.0 - 1.0
    huge = 1e4 * signs
    mixed = torch.cat([huge[..., :8], torch.randn(2, 4, 8, generator=gen)], dim=-1)
    for student, teacher in [(huge, -huge), (huge, mixed), (mixed, huge.flip(-1))]:
        value, g_s, g_t = value_and_grads(
            lambda s, t: token_divergence(s, t, kind, chunk_size=3), student.to(dtype), teacher.to(dtype),
            torch.ones(2, 4),
        )
        assert torch.isfinite(value).all() and (value >= 0).all()
        assert torch.isfinite(g_s).all() and torch.isfinite(g_t).all()


def bruteforce_with_forbidden_teacher_tokens(student, teacher, kind):
    """forward_kl, jsd and tvd in float64, where terms with p_T = 0 contribute 0."""
    p_s = torch.softmax(student.double(), -1)
    p_t = torch.softmax(teacher.double(), -1)
    allowed = p_t > 0
    log_p_t = torch.where(allowed, p_t, 1.0).log()
    if kind == "forward_kl":
        return torch.where(allowed, p_t * (log_p_t - p_s.log()), 0.0).sum(-1)
    if kind == "jsd":
        log_m = (0.5 * p_t + 0.5 * p_s).log()
        kl_t = torch.where(allowed, p_t * (log_p_t - log_m), 0.0).sum(-1)
        return 0.5 * kl_t + 0.5 * (p_s * (p_s.log() - log_m)).sum(-1)
    return 0.5 * (p_s - p_t).abs().sum(-1)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_teacher_forbidden_tokens_give_no_nan(kind):
    student, teacher = logits_pair((3, 4, 10))
    teacher[..., :3] = float("-inf")  # the teacher forbids tokens the student gives mass to
    weights = torch.ones(3, 4)
    value, g_s, g_t = value_and_grads(lambda s, t: token_divergence(s, t, kind), student, teacher, weights)
    assert torch.isfinite(value).all()
    assert torch.isfinite(g_s).all() and torch.isfinite(g_t).all()
    if kind == "reverse_kl":  # +inf mathematically; here large: each unit of forbidden mass costs ≈ 1e4 nats
        forbidden_mass = torch.softmax(student, -1)[..., :3].sum(-1)
        assert (value > 0.9e4 * forbidden_mass).all()
        return
    # Elsewhere terms with p_T = 0 contribute exactly 0, and the student gradient is exact.
    want, want_g_s, _ = value_and_grads(
        lambda s, t: bruteforce_with_forbidden_teacher_tokens(s, t, kind), student.double(), teacher.double(), weights
    )
    torch.testing.assert_close(value, want.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_s, want_g_s.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_vocab_masked_in_both_models_is_ignored(kind):
    student, teacher = logits_pair((3, 10))
    student[:, 7:] = float("-inf")
    teacher[:, 7:] = float("-inf")
    value, g_s, _ = value_and_grads(lambda s, t: token_divergence(s, t, kind), student, teacher, torch.ones(3))
    want, want_g_s, _ = value_and_grads(
        lambda s, t: bruteforce(s, t, kind), student[:, :7].double(), teacher[:, :7].double(), torch.ones(3)
    )
    torch.testing.assert_close(value, want.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_s[:, :7], want_g_s.float(), rtol=1e-4, atol=1e-6)
    assert (g_s[:, 7:] == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_identical_logits_give_zero_and_every_kind_is_nonnegative(kind):
    student, teacher = logits_pair((4, 6, 9), seed=5)
    same = token_divergence(student, student.clone(), kind)
    assert (same == 0).all()
    assert (token_divergence(student, teacher, kind) > 0).all()


def test_invalid_arguments_raise_helpful_errors():
    student, teacher = logits_pair((2, 5))
    with pytest.raises(ValueError) as info:
        token_divergence(student, teacher, kind="kl")
    assert all(kind in str(info.value) for kind in DIVERGENCES)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            token_divergence(student, teacher, kind="jsd", beta=beta)
    for temperature in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            token_divergence(student, teacher, temperature=temperature)
    with pytest.raises(ValueError, match="chunk_size"):
        token_divergence(student, teacher, chunk_size=-1)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)"):
        token_divergence(student, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="floating point"):
        token_divergence(student.long(), teacher.long())
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(3,\)"):
        sampled_token_logprobs(student, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        sampled_token_logprobs(student, torch.zeros(2))
    with pytest.raises(ValueError, match="temperature"):
        sampled_token_logprobs(student, torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        sampled_reverse_kl_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        masked_mean(torch.zeros(3), torch.ones(4))


def record_saved_tensors(fn, *args):
    saved = []

    def pack(x):
        saved.append((x.dtype, x.numel()))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn(*args)
    return out, saved


def big_float32(saved, numel):
    return [s for s in saved if s[0] == torch.float32 and s[1] >= numel]


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_backward_saves_only_the_inputs_not_float32_copies(kind):
    student, teacher = logits_pair((2, 4, 32), dtype=torch.bfloat16)
    student.requires_grad_(True)
    n_times_v = student.numel()
    # The hook does see the float32 [N, V] copies that a plain float32 computation keeps.
    _, naive = record_saved_tensors(
        lambda s, t: (torch.softmax(s.float(), -1) * torch.log_softmax(t.float(), -1)).sum(-1), student, teacher
    )
    assert big_float32(naive, n_times_v)

    out, saved = record_saved_tensors(lambda s, t: token_divergence(s, t, kind, chunk_size=3), student, teacher)
    assert not big_float32(saved, n_times_v)
    assert saved and all(dtype == torch.bfloat16 for dtype, _ in saved)
    out.sum().backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad.float()).all()


def test_sampled_token_logprobs_saves_no_float32_copy():
    logits = torch.randn(2, 4, 32, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(0, 32, (2, 4))
    out, saved = record_saved_tensors(lambda x: sampled_token_logprobs(x, tokens, chunk_size=3), logits)
    assert not big_float32(saved, logits.numel())
    assert {dtype for dtype, _ in saved} == {torch.bfloat16, torch.long}
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_token_logprobs_match_log_softmax_gather(chunk_size, temperature):
    gen = torch.Generator().manual_seed(6)
    logits = 3 * torch.randn(2, 5, 13, generator=gen)
    tokens = torch.randint(0, 13, (2, 5), generator=gen)
    weights = torch.rand(2, 5, generator=gen)

    def run(fn):
        x = logits.clone().requires_grad_(True)
        out = fn(x)
        (out * weights).sum().backward()
        return out.detach(), x.grad

    got = run(lambda x: sampled_token_logprobs(x, tokens, temperature=temperature, chunk_size=chunk_size))
    want = run(lambda x: torch.log_softmax(x / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1))
    assert got[0].dtype == torch.float32 and got[0].shape == tokens.shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_sampled_token_logprobs_bf16_grad_dtype_and_forbidden_tokens():
    logits = torch.randn(3, 8).to(torch.bfloat16)
    logits[:, 0] = float("-inf")
    logits.requires_grad_(True)
    tokens = torch.tensor([1, 2, 0])
    out = sampled_token_logprobs(logits, tokens)
    assert out.dtype == torch.float32
    assert torch.isfinite(out[:2]).all() and out[2] == float("-inf")
    out[:2].sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


V_MC = 8
N_MC = 200_000


def mc_setup():
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(V_MC, generator=gen, dtype=torch.float64)
    teacher = torch.randn(V_MC, generator=gen, dtype=torch.float64)
    return gen, student, teacher


def exact_reverse_kl_and_grad(student, teacher):
    z = student.clone().requires_grad_(True)
    kl = bruteforce(z, teacher, "reverse_kl")
    kl.backward()
    return kl.detach(), z.grad


def test_sampled_kl_estimate_is_unbiased_for_reverse_kl():
    gen, student, teacher = mc_setup()
    tokens = torch.multinomial(torch.softmax(student, -1), N_MC, replacement=True, generator=gen)
    s = sampled_token_logprobs(student.float().expand(N_MC, V_MC), tokens)
    t = sampled_token_logprobs(teacher.float().expand(N_MC, V_MC), tokens)
    loss, kl = sampled_reverse_kl_loss(s, t)
    exact, _ = exact_reverse_kl_and_grad(student, teacher)
    stderr = kl.double().std() / N_MC**0.5
    assert abs(kl.double().mean() - exact) < 4 * stderr
    torch.testing.assert_close(loss, kl)  # on-policy: ratio 1, advantage −k


@pytest.mark.parametrize("off_policy", [False, True])
def test_policy_gradient_matches_reverse_kl_gradient_on_average(off_policy):
    gen, student, teacher = mc_setup()
    behaviour = torch.zeros(V_MC, dtype=torch.float64) if off_policy else student
    tokens = torch.multinomial(torch.softmax(behaviour, -1), N_MC, replacement=True, generator=gen)
    z = student.float().requires_grad_(True)
    s = sampled_token_logprobs(z.expand(N_MC, V_MC), tokens)
    t = sampled_token_logprobs(teacher.float().expand(N_MC, V_MC), tokens)
    b = sampled_token_logprobs(behaviour.float().expand(N_MC, V_MC), tokens) if off_policy else None
    loss, kl = sampled_reverse_kl_loss(s, t, b)
    assert not kl.requires_grad
    loss.mean().backward()
    _, exact_grad = exact_reverse_kl_and_grad(student, teacher)
    # Per-sample gradient ρ·k·(onehot(x) − p_S), for the Monte-Carlo standard error.
    ratio = (s - (b if off_policy else s)).detach().double().exp()
    per_sample = (ratio * kl.double())[:, None] * (
        torch.nn.functional.one_hot(tokens, V_MC).double() - torch.softmax(student, -1)
    )
    stderr = per_sample.std(0) / N_MC**0.5
    torch.testing.assert_close(z.grad.double(), per_sample.mean(0), rtol=1e-4, atol=1e-5)
    assert ((z.grad.double() - exact_grad).abs() < 4 * stderr + 1e-6).all()


def test_sampled_loss_ratio_uses_detached_behaviour_and_floors_forbidden_tokens():
    s = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    t = torch.tensor([-1.5, float("-inf"), -0.5])
    b = torch.tensor([-1.2, -2.0, -0.1], requires_grad=True)
    loss, kl = sampled_reverse_kl_loss(s, t, b)
    torch.testing.assert_close(kl, torch.tensor([0.5, 1e4 - 2.0, 0.0]))
    torch.testing.assert_close(loss, torch.exp(s - b).detach() * kl)
    loss.sum().backward()
    torch.testing.assert_close(s.grad, torch.exp(s - b).detach() * kl)
    assert b.grad is None


def test_masked_mean_averages_over_mask_and_ignores_masked_infinities():
    values = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    out = masked_mean(values, mask)
    torch.testing.assert_close(out, torch.tensor(13.0 / 4))
    out.backward()
    torch.testing.assert_close(values.grad, mask.float() / 4)
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)) == 0
