"""rollout.engine=vllm on the real student (Gemma 3 270M pruned to 7 layers: head size 256, sliding-window layers,
a 262,144-token vocabulary, tied embeddings, BOS 2 / EOS 1 / PAD 0, left padding), against a real `vllm serve`
(one for this module) of its untied copy: greedy parity with the hf engine, the tied LM head synced after an
optimizer step, and a run that trains end to end through the engine. Every call here is a few tokens on batch 2:
the 262k × 640 LM head dominates each one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmopd import train
from mmopd.config import load_config
from mmopd.engines import HFRollout, VLLMRollout
from mmopd.engines.vllm import Served, ties_head, write_engine_checkpoint
from mmopd.run.objectives import Plan, Timer, objective_step
from mmopd.run.session import Session
from mmopd.step.batch import Sampling
from tests.vllm_server import start_server

pytestmark = pytest.mark.slow  # the real model: a server start of about a minute, seconds a call

PROMPTS = ["Question: What is 12 + 7?\nAnswer:", "The capital of France is", "def fibonacci(n):",
           "Return a new list containing all items from the iterable in"]
NEW_TOKENS = 8
WINDOW = 512  # the sliding-window layers' window
LONG = " ".join(["The sliding window of this layer ends here, and the next token reads only the last ones."] * 32)


@pytest.fixture(scope="module")
def pair(gemma_real, tmp_path_factory):
    """The real pair, a few prompts, and the student as a served engine loads it (its LM head untied)."""
    paths = dict(gemma_real)
    root = tmp_path_factory.mktemp("gemma_rollout")
    paths["train"] = root / "train.jsonl"
    paths["train"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = load_config(None, {"student.path": str(paths["student"]), "teacher.path": str(paths["teacher"]),
                                "data.train": str(paths["train"])})
    session = Session(config)
    paths["engine"] = write_engine_checkpoint(session.policy, root / "engine", lambda key: key,
                                              session.student_processor)
    del session
    yield paths
    shutil.rmtree(root)  # 1.5 GB: the untied copy and the head's own file


@pytest.fixture(scope="module")
def server(pair):
    server = start_server(pair["engine"], extra_args=("--max-model-len", str(WINDOW + 128), "--logprobs-mode",
                                                      "processed_logprobs"))
    yield server
    server.stop()


def _config(pair, server, tmp_path, **overrides):
    base = {"modality": "text", "student.path": str(pair["student"]), "teacher.path": str(pair["teacher"]),
            "data.train": str(pair["train"]), "rollout.max_new_tokens": NEW_TOKENS, "rollout.engine": "vllm",
            "rollout.url": server.url, "rollout.sync_dir": str(tmp_path / "sync"), "train.steps": 2,
            "train.batch_size": 2, "train.eval_every": 0, "train.save_every": 0, "train.warmup": 0,
            "train.out_dir": str(tmp_path / "run"), "train.progress": False, "train.lr": 1e-4,
            "objective.estimator": "sampled"}
    return load_config(None, {**base, **overrides})


def test_greedy_rollouts_of_the_real_student_equal_the_hf_engine_token_for_token(pair, server, tmp_path):
    session = Session(_config(pair, server, tmp_path))
    m = session.models()
    assert isinstance(m.rollout, VLLMRollout) and m.policy.space.size == 262144
    hf = HFRollout(m.policy, NEW_TOKENS)
    prompts = m.adapter.encode_prompts(session.train_data.records, m.policy.processor)  # left-padded, BOS first
    assert len(set(prompts.attention_mask.sum(1).tolist())) > 1 and all(row[0] == 2 for row in prompts.unpadded_ids())
    ours, theirs = (engine.sample(prompts, Sampling(temperature=0), None) for engine in (m.rollout, hf))
    assert torch.equal(ours.mask, theirs.mask)
    assert torch.equal(ours.tokens * ours.mask.long(), theirs.tokens * theirs.mask.long())
    assert ours.mask.sum() >= 2 * NEW_TOKENS  # real continuations, not an immediate EOS


def test_greedy_rollouts_past_the_sliding_window_equal_the_hf_engines(pair, server, tmp_path):
    """A prompt longer than the window: the sliding layers of both engines' KV-cached decoding see only its last
    512 positions, the full-attention one all of them."""
    session = Session(_config(pair, server, tmp_path))
    m = session.models()
    hf = HFRollout(m.policy, NEW_TOKENS)
    prompts = m.adapter.encode_prompts([{"prompt": LONG}, {"prompt": PROMPTS[0]}], m.policy.processor)
    assert WINDOW < prompts.input_ids.shape[1] <= WINDOW + 128 - NEW_TOKENS
    ours, theirs = (engine.sample(prompts, Sampling(temperature=0), None) for engine in (m.rollout, hf))
    assert torch.equal(ours.mask, theirs.mask)
    assert torch.equal(ours.tokens * ours.mask.long(), theirs.tokens * theirs.mask.long())


def test_the_tied_head_follows_an_optimizer_step_through_the_sync(pair, server, tmp_path):
    """One SGD step moves the tied embedding and LM head. A plain tied save (what `reload_weights` would get
    without mmopd's untying) leaves the engine's head stale; mmopd's sync brings it to the trainer's weights."""
    config = _config(pair, server, tmp_path, **{"train.lr": 1e-3})
    session = Session(config)
    m = session.models()
    policy = m.policy.model
    assert ties_head(pair["student"]) and policy.lm_head.weight is policy.model.embed_tokens.weight
    records = session.train_data.records[:2]
    m.rollout.sync(policy)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=config.train.lr)
    before = policy.lm_head.weight.detach().clone()
    row = objective_step(m, records, Plan.of(config), torch.Generator().manual_seed(0), Timer(),
                         lambda loss: loss.backward())
    optimizer.step()
    assert row["rollout/logprob_mismatch"] < 1e-3  # the engine sampled from the trainer's weights
    assert (policy.lm_head.weight - before).abs().max() > 1e-3  # the step moved the tied head

    mismatch = lambda: objective_step(m, records, Plan.of(config), torch.Generator().manual_seed(1), Timer(),
                                      lambda loss: None)["rollout/logprob_mismatch"]
    tied = tmp_path / "tied"
    policy.save_pretrained(tied)  # every new weight, the head only as the tied embedding
    Served(server.url, 120.0, 0).reload_weights(tied)
    stale_head = mismatch()
    m.rollout.sync(policy)
    synced = mismatch()
    assert synced < 1e-3 < stale_head, (synced, stale_head)


def test_a_run_trains_end_to_end_on_the_real_pair_through_the_served_engine(pair, server, tmp_path):
    summary = train(_config(pair, server, tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert summary["steps"] == 2 and len(steps) == 2
    assert all(r["time/sync"] > 0 and r["rollout/logprob_mismatch"] < 1e-3 for r in steps)
    assert all(r["response_tokens"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in steps)
