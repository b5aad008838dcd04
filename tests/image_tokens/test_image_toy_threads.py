"""A toy build gives the same weights whatever the caller's thread count (it builds on one thread), so the
demos print the same numbers on every machine setting."""

from __future__ import annotations

import torch

from mmopd.run.toys import build_toy
from modalities.image_tokens import toy


def test_a_toy_build_gives_the_same_weights_with_one_thread_or_two(tmp_path, monkeypatch):
    # the image toy at its TINY size (2 steps each of VQ, judge, teacher, student): its VQ and judge differ
    # between 1 and 2 threads when built without the pin
    monkeypatch.setattr(toy, "build", lambda out, family, progress, seed: toy.build_toy(out, progress, seed, toy.TINY))
    threads, weights = torch.get_num_threads(), {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = tmp_path / f"threads-{n}"
            build_toy("image_tokens", out, None, progress=False)
            assert torch.get_num_threads() == n  # the caller's count is restored
            weights[n] = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}
    finally:
        torch.set_num_threads(threads)
    assert sorted(weights[1]) == ["judge/judge.safetensors", "student/model.safetensors",
                                  "student/vq/model.safetensors", "teacher/model.safetensors",
                                  "teacher/vq/model.safetensors"]
    assert weights[1] == weights[2]
