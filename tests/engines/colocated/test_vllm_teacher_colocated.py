"""teacher.engine=vllm without teacher.url: a `vllm.LLM` of teacher.path in this process (vLLM's venv) scores
through `prompt_logprobs` exactly as the served teacher does; the trainer itself holds only the teacher's config
and tokenizer. Token log-probs and top-k equal the hf teacher's on the text toy, and on a LLaVA with one and two
pictures per row (the pictures as `multi_modal_data`, only the response positions scored)."""

from __future__ import annotations

import pytest
import torch

from mmopd.config import load_config
from mmopd.engines import DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, HFTeacher, TeacherNeed, VLLMTeacher
from mmopd.engines.vllm import Colocated
from mmopd.run.session import Session
from modalities.vlm import shapes
from tests.engines.test_vllm_teacher import build_scoring_pair, responses_of_different_lengths
from tests.engines.test_vllm_teacher_modalities import check_llava_teacher
from tests.vllm_models import build_llava

pytestmark = pytest.mark.slow  # each engine starts in 30-60 s
K = 5
MEMORY = 0.1  # on a CPU, the share of RAM each engine takes; two of the module's engines live at once


def _sessions(overrides):
    """The run with the colocated vLLM teacher, its models, and the hf teacher's models of the same run."""
    vllm = Session(load_config(None, {**overrides, "teacher.engine": "vllm", "teacher.top_k": K,
                                      "teacher.gpu_memory_utilization": MEMORY}))
    hf = Session(load_config(None, {**overrides, "teacher.engine": "hf", "teacher.top_k": K})).models()
    hf.scorer = HFTeacher(hf.adapter, hf.teacher.model, hf.policy.space, fused=False)  # logits, not hidden states
    return vllm, vllm.models(), hf


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    paths = build_scoring_pair(tmp_path_factory.mktemp("colocated_teacher"))
    return _sessions({"modality": "text", "student.path": str(paths["student"]),
                      "teacher.path": str(paths["teacher"]), "data.train": str(paths["train"]),
                      "rollout.max_new_tokens": 8, "train.batch_size": 8})


def test_a_colocated_teacher_runs_vllm_in_the_trainer_and_holds_no_weights_itself(text):
    session, m, _ = text
    assert isinstance(m.scorer, VLLMTeacher) and isinstance(m.scorer.transport, Colocated)
    assert all(p.is_meta for p in session.teacher.parameters())


def test_colocated_token_logprobs_equal_the_hf_teachers_on_rows_of_different_lengths(text):
    session, m, hf = text
    prompts, rollout = responses_of_different_lengths(m, session.train_data.records[:8])
    assert len(set(prompts.attention_mask.sum(1).tolist())) > 1 and len(set(rollout.mask.sum(1).tolist())) > 1
    ours = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOKEN_LOGPROBS))
    theirs = hf.scorer.score(prompts, rollout.tokens, TeacherNeed(TOKEN_LOGPROBS))
    torch.testing.assert_close(ours.values * rollout.mask, theirs.values * rollout.mask, atol=1e-4, rtol=0)


def test_colocated_top_k_are_the_hf_teachers_largest_log_probs(text):
    session, m, hf = text
    prompts, rollout = responses_of_different_lengths(m, session.train_data.records[:8])
    ours = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOP_K, k=K))
    full = hf.scorer.score(prompts, rollout.tokens, TeacherNeed(DISTRIBUTION)).values.float().log_softmax(-1)
    valid = rollout.mask.bool()
    torch.testing.assert_close(ours.values[valid], full.topk(K, dim=-1).values[valid], atol=1e-4, rtol=0)
    torch.testing.assert_close(full.gather(-1, ours.ids)[valid], ours.values[valid], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("colocated_llava_teacher")
    path = build_llava(root / "llava")
    data = shapes.write_split(root / "data", "train", 6, seed=1, held_out=False)
    return _sessions({"modality": "vlm", "student.path": str(path), "teacher.path": str(path),
                      "data.train": str(data), "rollout.max_new_tokens": 6})


@pytest.mark.parametrize("pictures", [1, 2])
def test_colocated_llava_teacher_scores_the_response_after_one_or_two_pictures_as_hf(llava, pictures):
    session, m, hf = llava
    check_llava_teacher(session, m, hf, pictures)
