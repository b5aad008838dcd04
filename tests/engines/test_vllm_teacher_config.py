"""teacher.engine=vllm at the edge, without a server: what a served teacher cannot do is refused before step 1,
and a teacher URL that is down is a clear error naming it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from mmopd.config import ConfigError, load_config
from mmopd.engines import TOKEN_LOGPROBS, EngineError, TeacherNeed, VLLMTeacher
from mmopd.engines.vllm import Served
from mmopd.models.adapter import ModelLoadError
from mmopd.models.compat import IncompatibleModelsError
from mmopd.run.session import Session
from mmopd.step.batch import PromptBatch, TokenSpace
from tests.vllm_models import build_text_pair, config_and_tokenizer

URL = "http://127.0.0.1:9"


def _load(**overrides):
    base = {"student.path": "s", "teacher.path": "t", "data.train": "d.jsonl", "teacher.engine": "vllm",
            "teacher.url": URL}
    return load_config(None, {**base, **overrides})


def test_a_served_teacher_without_top_k_takes_the_full_distribution_at_any_temperature():
    """Its last hidden states and the trainer's copy of its head: any divergence, any temperature."""
    config = _load(**{"objective.divergence": "forward_kl", "objective.temperature": 2.0})
    assert (config.teacher.top_k, config.objective.temperature) == (0, 2.0)


def test_a_served_teacher_accepts_top_k_and_the_sampled_estimator():
    assert _load(**{"teacher.top_k": 8}).teacher.top_k == 8
    assert _load(**{"objective.estimator": "sampled"}).teacher.engine == "vllm"


def test_a_colocated_vllm_teacher_refuses_the_full_distribution_naming_the_options():
    assert _load(**{"teacher.top_k": 8, "teacher.url": ""}).teacher.url == ""
    with pytest.raises(ConfigError, match="colocated .*teacher.url .*teacher.top_k: K .*objective.estimator: sampled"
                                          ".*teacher.engine: hf"):
        _load(**{"teacher.url": ""})


@pytest.mark.parametrize("overrides, match", [
    ({"objective.estimator": "sampled", "objective.temperature": 2.0}, "temperature 1"),
    ({"teacher.top_k": 8, "objective.temperature": 2.0}, "temperature 1"),
    ({"teacher.top_k": 8, "teacher.cfg_scale": 3.0}, "conditional and unconditional"),
    ({"teacher.top_k": 8, "teacher.sharding": "fsdp"}, "teacher.sharding=fsdp shards an in-process teacher"),
    ({"teacher.top_k": 8, "teacher.url": "", "teacher.gpu_memory_utilization": 0.0}, r"must lie in \(0, 1\]"),
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


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    return build_text_pair(tmp_path_factory.mktemp("weightless_teacher"))


def _session(text_pair, teacher_path, **overrides):
    return Session(_load(**{"modality": "text", "student.path": str(text_pair["student"]),
                            "teacher.path": str(teacher_path), "data.train": str(text_pair["train"]),
                            "rollout.max_new_tokens": 8, "objective.estimator": "sampled", **overrides}))


def test_a_vllm_teacher_loads_only_its_config_and_tokenizer_in_the_trainer(text_pair, tmp_path):
    weightless = config_and_tokenizer(text_pair["teacher"], tmp_path / "teacher")
    session = _session(text_pair, weightless)
    assert not session.teacher_in_process
    assert all(p.is_meta for p in session.teacher.parameters())  # shapes and config only: no weight in memory
    m = session.models()
    assert isinstance(m.scorer, VLLMTeacher)
    assert _session(text_pair, text_pair["teacher"], **{"teacher.engine": "hf", "teacher.url": ""}).teacher_in_process


def test_a_vllm_teacher_still_checks_the_pair_from_its_config(text_pair, tmp_path):
    weightless = config_and_tokenizer(text_pair["teacher"], tmp_path / "teacher")
    config = json.loads((weightless / "config.json").read_text())
    (weightless / "config.json").write_text(json.dumps({**config, "vocab_size": 8}))
    with pytest.raises(IncompatibleModelsError, match="teacher's LM head has 8 rows"):
        _session(text_pair, weightless)


@pytest.mark.parametrize("where", ["an empty directory", "no directory"])
def test_a_vllm_teacher_path_without_its_tokenizer_is_one_clear_error(text_pair, tmp_path, where):
    teacher = tmp_path / "teacher"
    if where == "an empty directory":
        teacher.mkdir()
    with pytest.raises(ModelLoadError, match=r"teacher.path=.*cannot load.*config and tokenizer") as err:
        _session(text_pair, teacher)
    assert "\n" not in str(err.value)


def test_a_served_teacher_of_the_full_distribution_reads_its_head_from_teacher_path(text_pair):
    """The trainer's copy of the head equals the teacher's own (a tied head: read from the embeddings' key)."""
    session = _session(text_pair, text_pair["teacher"], **{"objective.estimator": "full"})
    scorer = session.models().scorer
    teacher = transformers.AutoModelForCausalLM.from_pretrained(text_pair["teacher"])
    assert teacher.config.tie_word_embeddings and scorer.head.bias is None
    assert torch.equal(scorer.head.weight, teacher.get_output_embeddings().weight)
    assert all(p.is_meta for p in session.teacher.parameters())  # the rest of the teacher stays unloaded


def test_a_served_teacher_of_the_full_distribution_without_weights_at_teacher_path_is_refused(text_pair, tmp_path):
    weightless = config_and_tokenizer(text_pair["teacher"], tmp_path / "teacher")
    with pytest.raises(ConfigError, match=r"holds no LM head \(lm_head.weight or model.embed_tokens.weight\)"):
        _session(text_pair, weightless, **{"objective.estimator": "full"}).models()
