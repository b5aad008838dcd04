"""teacher.engine=vllm on the real teacher (Gemma 3 270M, 18 layers: head size 256, sliding-window layers, a
262,144-token vocabulary, tied embeddings), served by one real `vllm serve` for this module as it was exported:
token log-probs and top-k equal the hf teacher's in float32, greedy decoding equals the hf engine's, and a run that
trains the real student end to end against the served teacher. A few tokens on batch 2 each."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from mmopd import train
from mmopd.config import load_config
from mmopd.engines import DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, HFRollout, HFTeacher, TeacherNeed, VLLMTeacher
from mmopd.engines.vllm import Served, VLLMRollout
from mmopd.run.session import Session
from mmopd.step.batch import Sampling
from mmopd.step.scores import TokenLogprobs, TopKTail
from tests.vllm_server import start_server

pytestmark = pytest.mark.slow  # the real model: a server start of about a minute, seconds a call

PROMPTS = ["Question: What is 12 + 7?\nAnswer:", "The capital of France is", "def fibonacci(n):",
           "Return a new list containing all items from the iterable in"]
NEW_TOKENS = 8
K = 5


@pytest.fixture(scope="module")
def pair(gemma_real, tmp_path_factory):
    paths = dict(gemma_real)
    paths["train"] = tmp_path_factory.mktemp("gemma_teacher") / "train.jsonl"
    paths["train"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return paths


@pytest.fixture(scope="module")
def server(pair):
    server = start_server(pair["teacher"], extra_args=("--max-model-len", "128", "--max-logprobs", str(K)))
    yield server
    server.stop()


def _config(pair, server, tmp_path, **overrides):
    base = {"modality": "text", "student.path": str(pair["student"]), "teacher.path": str(pair["teacher"]),
            "data.train": str(pair["train"]), "rollout.max_new_tokens": NEW_TOKENS, "teacher.engine": "vllm",
            "teacher.url": server.url, "train.steps": 2, "train.batch_size": 2, "train.eval_every": 0,
            "train.save_every": 0, "train.warmup": 0, "train.out_dir": str(tmp_path / "run"),
            "train.progress": False, "train.lr": 1e-4, "objective.estimator": "sampled"}
    return load_config(None, {**base, **overrides})


@pytest.fixture(scope="module")
def hf_teacher(pair):
    """The same teacher in process, in float32, as the hf engine scores with it."""
    session = Session(load_config(None, {"student.path": str(pair["student"]), "teacher.path": str(pair["teacher"]),
                                         "data.train": str(pair["train"])}))
    return session.teacher


def _sampled(m, records):
    """The student's samples (T=1) for prompts of different lengths (left-padded, BOS first)."""
    prompts = m.adapter.encode_prompts(records, m.policy.processor)
    assert len(set(prompts.attention_mask.sum(1).tolist())) > 1 and all(row[0] == 2 for row in prompts.unpadded_ids())
    return prompts, m.rollout.sample(prompts, Sampling(temperature=1.0), torch.Generator().manual_seed(0))


def test_served_token_logprobs_of_the_real_teacher_equal_the_hf_teachers(pair, server, hf_teacher, tmp_path):
    session = Session(_config(pair, server, tmp_path))
    m = session.models()
    assert isinstance(m.scorer, VLLMTeacher) and m.policy.space.size == 262144
    prompts, rollout = _sampled(m, session.train_data.records[:2])
    ours = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOKEN_LOGPROBS))
    theirs = HFTeacher(m.adapter, hf_teacher, m.policy.space, fused=True).score(prompts, rollout.tokens,
                                                                         TeacherNeed(TOKEN_LOGPROBS))
    assert isinstance(ours, TokenLogprobs) and rollout.mask.sum() >= NEW_TOKENS
    torch.testing.assert_close(ours.values * rollout.mask, theirs.values * rollout.mask, atol=1e-3, rtol=0)


def test_served_top_k_of_the_real_teacher_are_its_largest_log_probs_over_262k_tokens(pair, server, hf_teacher,
                                                                                    tmp_path):
    session = Session(_config(pair, server, tmp_path, **{"objective.estimator": "full", "teacher.top_k": K}))
    m = session.models()
    prompts, rollout = _sampled(m, session.train_data.records[2:4])
    ours = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOP_K, k=K))
    assert isinstance(ours, TopKTail) and ours.values.shape == (*rollout.tokens.shape, K)
    full = HFTeacher(m.adapter, hf_teacher, m.policy.space, fused=False).score(prompts, rollout.tokens,
                                                                        TeacherNeed(DISTRIBUTION))
    logprobs = full.values.float().log_softmax(-1)  # [B, T, 262144]
    valid = rollout.mask.bool()
    torch.testing.assert_close(ours.values[valid], logprobs.topk(K, dim=-1).values[valid], atol=1e-3, rtol=0)
    torch.testing.assert_close(logprobs.gather(-1, ours.ids)[valid], ours.values[valid], atol=1e-3, rtol=0)


def test_greedy_decoding_of_the_served_teacher_equals_the_hf_engine(pair, server, hf_teacher, tmp_path):
    """The 18-layer teacher (five sliding-window layers in six) decodes greedily as mmopd's own KV-cache loop does.
    It only samples here, so the tied head it was served with is no concern (no sync)."""
    session = Session(_config(pair, server, tmp_path))
    m = session.models()
    new = 10  # " 12 + 7 = 19" is 10 tokens: the digits are one a token
    side = m.policy
    served = VLLMRollout(Served(server.url, 120.0, 0), side.space, side.eos_ids, side.pad_id, new, tmp_path / "sync",
                         lora=False, engine_key=lambda key: key)
    hf = HFRollout(replace(m.policy, model=hf_teacher), new)
    prompts = m.adapter.encode_prompts(session.train_data.records, m.teacher.processor)
    ours, theirs = (engine.sample(prompts, Sampling(temperature=0), None) for engine in (served, hf))
    texts = [m.adapter.decode(r.tokens, r.mask, m.teacher.processor) for r in (ours, theirs)]
    assert torch.equal(ours.mask, theirs.mask), texts
    assert torch.equal(ours.tokens * ours.mask.long(), theirs.tokens * theirs.mask.long()), texts
    answer = texts[0][0]
    assert answer.startswith(" 12 + 7 = 19"), answer  # the real model, coherent


def test_a_run_trains_the_real_student_end_to_end_against_the_served_teacher(pair, server, tmp_path):
    summary = train(_config(pair, server, tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert summary["steps"] == 2 and len(steps) == 2
    assert all(r["response_tokens"] > 0 and r["teacher_tokens_per_s"] > 0 for r in steps)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in steps)
