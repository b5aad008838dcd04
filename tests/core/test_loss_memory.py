"""The logits path's extra memory, counted deterministically: the bytes of CPU tensors allocated and not yet freed
(torch's profiler records each allocation and free), at their peak during forward and backward.

`token_divergence` over [N, V] logits holds, beyond its inputs, the [N, V] gradient it returns and one chunk's
float32 buffers: three [rows, V] for reverse KL (s, t and the product inside the sum), never a previous chunk's.
At N = 4,096, V = 32,000 (1,048 rows a chunk) that is 500 + 3·128 = 884 MiB; it was 1,140 MiB when the
reverse KL held a fourth buffer and backward kept the last chunk's gradient alive into the next chunk.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from mmopd.losses import fused_divergence_loss, token_divergence


def peak_allocated_bytes(fn) -> int:
    """The peak, over one call of fn, of the CPU tensor bytes it allocated and had not freed."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_reverse_kl_over_logits_holds_the_gradient_and_one_chunk_of_three_buffers():
    n, v, rows = 1024, 8000, 256  # four chunks, as the default's 1,048 rows make of N = 4,096 at V = 32,000
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, v, generator=g).requires_grad_()
    teacher = torch.randn(n, v, generator=g)
    peak = peak_allocated_bytes(lambda: token_divergence(student, teacher, "reverse_kl",
                                                         chunk_size=rows).mean().backward())
    grad, chunk = n * v * 4, rows * v * 4  # [N, V] and [rows, V] float32
    assert grad + 3 * chunk <= peak <= grad + 3 * chunk + 64 * 1024  # + the [N] values and their gradient
    assert peak <= 986 / 500 * grad  # the bound: 986 MiB against the 500 MiB gradient at N·V = 4,096·32,000


def test_fused_reverse_kl_loss_holds_one_chunk_and_the_head_gradient_never_n_by_v():
    n, v, h, rows = 1024, 8000, 16, 64
    g = torch.Generator().manual_seed(0)
    s_hidden = torch.randn(n, h, generator=g).requires_grad_()
    s_weight = torch.randn(v, h, generator=g).requires_grad_()
    t_hidden, t_weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    weights = torch.full((n,), 1.0 / n)
    peak = peak_allocated_bytes(lambda: fused_divergence_loss(s_hidden, s_weight, t_hidden, t_weight, weights,
                                                              chunk_size=rows)[0].backward())
    chunk = rows * v * 4  # [rows, V] float32
    # both heads' logits, s, t and the product inside the sum: five [rows, V]; and the [V, H] gradient
    assert peak <= 5 * chunk + v * h * 4 + 128 * 1024 < n * v * 4
