"""teacher.engine=vllm at the edge, without a server: what a served teacher cannot do is refused before step 1,
and a teacher URL that is down is a clear error naming it."""

from __future__ import annotations

import pytest
import torch

from mmopd.batch import PromptBatch, TokenSpace
from mmopd.config import ConfigError, load_config
from mmopd.engines import TOKEN_LOGPROBS, EngineError, TeacherNeed, VLLMTeacher
from mmopd.engines.vllm import Served

URL = "http://127.0.0.1:9"


def _load(**overrides):
    base = {"student.path": "s", "teacher.path": "t", "data.train": "d.jsonl", "teacher.engine": "vllm",
            "teacher.url": URL}
    return load_config(None, {**base, **overrides})


def test_a_served_teacher_without_top_k_refuses_the_full_distribution_naming_the_options():
    with pytest.raises(ConfigError, match="teacher.top_k: K .*objective.estimator: sampled.*teacher.engine: hf"):
        _load(**{"objective.divergence": "forward_kl"})


def test_a_served_teacher_accepts_top_k_and_the_sampled_estimator():
    assert _load(**{"teacher.top_k": 8}).teacher.top_k == 8
    assert _load(**{"objective.estimator": "sampled"}).teacher.engine == "vllm"


@pytest.mark.parametrize("overrides, match", [
    ({"objective.estimator": "sampled", "objective.temperature": 2.0}, "temperature 1"),
    ({"teacher.top_k": 8, "teacher.cfg_scale": 3.0}, "conditional and unconditional"),
    ({"teacher.top_k": 8, "teacher.url": ""}, "teacher.url=http://host:port"),
    ({"teacher.top_k": 8, "teacher.url": "127.0.0.1:8000"}, "must be an http"),
    ({"teacher.top_k": 8, "teacher.engine": "hf"}, "teacher.url is set, but teacher.engine=hf"),
])
def test_what_a_served_teacher_cannot_do_is_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _load(**overrides)


def test_a_teacher_that_is_down_is_a_clear_error_naming_its_url_and_settings():
    teacher = VLLMTeacher(Served(URL, timeout=1.0, retries=1, role="teacher"), TokenSpace(10), eos_ids=[1])
    prompts = PromptBatch(torch.tensor([[0, 3, 4]]), torch.tensor([[0, 1, 1]]))
    with pytest.raises(EngineError, match=rf"vLLM at {URL} did not answer .*\(teacher.url\)"):
        teacher.score(prompts, torch.tensor([[5, 1, 0]]), TeacherNeed(TOKEN_LOGPROBS))
