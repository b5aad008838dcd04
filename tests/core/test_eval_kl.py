"""The student's KL to its teacher on held-out prompts, both ways: the reverse KL on the student's own samples
and the forward KL on the teacher's (coverage), checked against a brute-force computation, logged by a run and
printed in its end table."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import mmopd
from mmopd.engines.hf import rollout
from mmopd.models.hf import positions
from mmopd.run import evaluation
from mmopd.run.evaluation import kl_to_teacher
from mmopd.run.report import format_table, read_metrics
from mmopd.run.session import Session
from mmopd.step.batch import Sampling

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(session, records, batch_size, max_new):
    """Sum over every masked response token of Σ_v p(v) (log p(v) − log q(v)), from whole-batch forwards."""
    a, gen = session.adapter, torch.Generator().manual_seed(0)
    sums = {"reverse_kl": [0.0, 0.0], "forward_kl": [0.0, 0.0]}
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        s = a.encode_prompts(chunk, session.student_processor)
        t = a.encode_prompts(chunk, session.teacher_processor)
        for name, p_model, q_model, p_prompts, q_prompts in (("reverse_kl", session.policy, session.teacher, s, t),
                                                               ("forward_kl", session.teacher, session.policy, t, s)):
            out = rollout(session.side(p_model, None), p_prompts, max_new, Sampling(temperature=1.0), gen)
            logps = []
            for model, prompts in ((p_model, p_prompts), (q_model, q_prompts)):
                ids = torch.cat([prompts.input_ids, out.tokens], 1)
                mask = torch.cat([prompts.attention_mask, torch.ones_like(out.tokens)], 1)
                with torch.no_grad():
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
                P = prompts.input_ids.shape[1]
                logps.append(logits[:, P - 1:-1, :session.space.size].double().log_softmax(-1))
            kl = F.kl_div(logps[1], logps[0], log_target=True, reduction="none").sum(-1)  # [B, T]
            sums[name][0] += float((kl * out.mask).sum())
            sums[name][1] += float(out.mask.sum())
    return {name: total / count for name, (total, count) in sums.items()}


@pytest.mark.parametrize("budget", [1 << 24, 1])  # every row in one forward; one row a forward (as at 262k)
def test_both_kls_match_a_brute_force_computation(text_config, monkeypatch, budget):
    monkeypatch.setattr(evaluation, "LOGIT_BUDGET", budget)
    session = Session(text_config(), for_eval=True, need_teacher=True)
    records = session.eval_data.records[:6]
    got = kl_to_teacher(session.side(session.policy, session.student_processor),
                        session.side(session.teacher, session.teacher_processor), records, 8, 4, session.device)
    want = brute_force(session, records, 4, 8)
    assert got["reverse_kl"] > 0 and got["forward_kl"] > 0
    assert got == pytest.approx(want, rel=1e-5)


def test_a_student_equal_to_its_teacher_is_at_zero_both_ways(text_config, tiny_text):
    session = Session(text_config(**{"student.path": str(tiny_text["teacher"])}), for_eval=True, need_teacher=True)
    got = session.eval_kl(session.policy)
    assert got == pytest.approx({"reverse_kl": 0.0, "forward_kl": 0.0}, abs=1e-6)


def test_a_run_logs_both_kls_before_and_after_and_prints_them(text_config, tmp_path):
    summary = mmopd.train(text_config(**{"train.eval_kl_prompts": 4}))
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert all(r["eval/reverse_kl"] > 0 and r["eval/forward_kl"] > 0 for r in evals)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["kl_before"] == {"reverse_kl": evals[0]["eval/reverse_kl"], "forward_kl": evals[0]["eval/forward_kl"]}
    assert saved["kl_after"]["forward_kl"] == evals[1]["eval/forward_kl"]
    table = format_table(summary)
    assert "forward KL, teacher's samples" in table and f"{saved['kl_after']['forward_kl']:8.3f}" in table


def test_eval_kl_prompts_zero_turns_it_off(text_config, tmp_path):
    summary = mmopd.train(text_config(**{"train.eval_kl_prompts": 0}))
    assert "kl_before" not in summary and "kl_after" not in summary
    assert not any("eval/forward_kl" in r for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))
