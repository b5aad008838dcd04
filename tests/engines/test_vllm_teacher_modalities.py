"""A served teacher (a real `vllm serve`, one per model, shared by the session: conftest.py) beyond text: a LLaVA
with one and two pictures per row (token ids plus pictures through `/inference/v1/generate`, served with
--enable-scale-out), and the image toy's unguided LlamaGen generator, restricted to its codebook. Their log-probs equal the hf teacher's.

vLLM's prompt log-probs are over the teacher's whole vocabulary; the hf teacher renormalises over the
TokenSpace (the VLM's text tokens without the image placeholder; the generator's codebook). So the reference is
the hf teacher's full-vocabulary log-softmax, and the hf teacher's own values are the served ones minus the
log of the mass the teacher puts inside the space."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mmopd.config import load_config
from mmopd.engines import TOKEN_LOGPROBS, TOP_K, HFTeacher, TeacherNeed, VLLMTeacher
from mmopd.engines.vllm import Served
from mmopd.models.adapter import get_adapter, settings_of
from mmopd.run.session import Session
from mmopd.step.batch import Sampling
from modalities.vlm import shapes
from tests.vllm_models import build_image_tokens, build_llava, config_and_tokenizer

pytestmark = pytest.mark.slow  # each vLLM server starts in about a minute
K = 5


def full_vocab_logprobs(adapter, model, prompts, tokens):
    """The hf model's log-softmax over its whole vocabulary at each response position: [B, T] -> [B, T, V]."""
    with torch.no_grad():
        return adapter.calls.response_logits(model, prompts, tokens).float().log_softmax(-1)


def check_against_hf(ours, hf_values, full, tokens, valid, space_ids):
    """Served token log-probs [B, T] equal hf's full-vocabulary ones; renormalised over the space, hf's own."""
    expected = full.gather(-1, tokens[..., None])[..., 0]  # [B, T]
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-4, rtol=0)
    in_space = full[..., space_ids].logsumexp(-1)  # [B, T]: log of the teacher's mass inside the space
    torch.testing.assert_close(hf_values[valid], (ours - in_space)[valid], atol=1e-4, rtol=0)
    return in_space[valid]


@pytest.fixture(scope="session")
def llava_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("served_llava_teacher")
    path = build_llava(root / "llava")
    data = shapes.write_split(root / "data", "train", 6, seed=1, held_out=False)
    return path, config_and_tokenizer(path, root / "llava_config_only"), data, \
        Path(shutil.copytree(path, root / "llava_student"))


@pytest.fixture
def llava(llava_model, vllm_servers):
    """The LLaVA, its weightless copy, 6 shapes-VQA records, the session's server of the LLaVA, and a student: a
    copy of it (a teacher server that serves student.path is refused, mmopd/engines/vllm/identity.py)."""
    path, weightless, data, student = llava_model
    return path, weightless, data, vllm_servers.get("llava", path, ("--max-logprobs", str(K), "--enable-scale-out")), \
        student


def check_llava_teacher(session, m, hf, pictures):
    """The vLLM teacher of `m` scores students' responses to 4 records with `pictures` pictures each as the hf
    teacher of `hf` does: token log-probs and top-k, only at the response positions."""
    records = [{**r, "images": r["images"] * pictures,
                "prompt": r["prompt"] if pictures == 1 else "two pictures: " + r["prompt"]}
               for r in session.train_data.records[:4]]
    prompts = m.adapter.encode_prompts(records, m.teacher.processor)
    assert all(len(row) == pictures for row in prompts.state["images"])
    rollout = m.rollout.sample(m.adapter.encode_prompts(records, m.policy.processor), Sampling(temperature=1.0),
                               torch.Generator().manual_seed(0))
    valid = rollout.mask.bool()
    full = full_vocab_logprobs(hf.adapter, hf.teacher.model, prompts, rollout.tokens)  # [B, T, V]
    ours = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOKEN_LOGPROBS)).values
    theirs = HFTeacher(hf.adapter, hf.teacher.model, hf.policy.space, fused=False).score(prompts, rollout.tokens,
                                                                            TeacherNeed(TOKEN_LOGPROBS)).values
    check_against_hf(ours, theirs, full, rollout.tokens, valid, m.policy.space.token_ids())
    top = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOP_K, k=K))
    expected = full.topk(K, dim=-1)  # [B, T, K]; ids outside the TokenSpace go to the tail, leaving -inf slots
    inside = torch.isin(expected.indices, torch.tensor(m.policy.space.token_ids()))
    kept = torch.where(inside, expected.values, float("-inf")).sort(-1, descending=True).values
    torch.testing.assert_close(top.values[valid], kept[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("pictures", [1, 2])
def test_a_served_llava_teacher_scores_the_response_after_one_or_two_pictures_as_hf(llava, pictures):
    path, weightless, data, server, student = llava
    base = {"modality": "vlm", "student.path": str(student), "data.train": str(data), "rollout.max_new_tokens": 6,
            "objective.estimator": "sampled"}
    session = Session(load_config(None, {**base, "teacher.path": str(weightless), "teacher.engine": "vllm",
                                         "teacher.url": server.url}))
    hf = Session(load_config(None, {**base, "teacher.path": str(path)})).models()
    check_llava_teacher(session, session.models(), hf, pictures)


@pytest.fixture(scope="session")
def generator_model(tmp_path_factory):
    return build_image_tokens(tmp_path_factory.mktemp("served_image_teacher") / "generator")


@pytest.fixture
def generator(generator_model, vllm_servers):
    """The image toy's LlamaGen generator served with room for a whole picture: max_model_len = prompt (class,
    BOI) + 16 codes + the 1 token a completion must leave."""
    return generator_model, vllm_servers.get("generator", generator_model, ("--max-model-len", "19"),
                                             env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"})


def test_a_served_unguided_image_token_teacher_gives_the_hf_teachers_log_probs_over_its_codebook(generator):
    path, server = generator
    config = load_config(None, {"modality": "image_tokens", "student.path": str(path), "teacher.path": str(path),
                                "data.train": "unused.jsonl", "objective.estimator": "sampled",
                                "rollout.max_new_tokens": 16})
    adapter = get_adapter("image_tokens", settings_of(config))
    processor = adapter.load_processor(str(path), "teacher")
    model = adapter.calls.load_model(str(path), "teacher", torch.float32)
    space = adapter.token_space(processor, model)
    prompts = adapter.encode_prompts([{"label": i % 3, "prompt": None, "answer": None} for i in range(6)], processor)
    tokens = torch.randint(0, processor.codebook_size, (6, 16), generator=torch.Generator().manual_seed(0))
    served = VLLMTeacher(Served(server.url, timeout=60, retries=1, role="teacher"), space, eos_ids=[])
    ours = served.score(prompts, tokens, TeacherNeed(TOKEN_LOGPROBS)).values
    theirs = HFTeacher(adapter, model, space, fused=False).score(prompts, tokens, TeacherNeed(TOKEN_LOGPROBS)).values
    full = full_vocab_logprobs(adapter, model, prompts, tokens)
    in_space = check_against_hf(ours, theirs, full, tokens, torch.ones_like(tokens, dtype=torch.bool),
                                space.token_ids())
    assert (in_space < 0).all()  # the random generator puts some mass outside its codebook: the served teacher
    # cannot renormalise it away, so its log-probs sit below the hf teacher's by exactly that log-mass
