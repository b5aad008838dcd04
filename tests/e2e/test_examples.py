"""The example scripts run as a user copies them: each distils its modality's tiny pair for two steps
through mmopd.train and writes the run directory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import transformers

from tests.image_tokens.helpers import GRID_TOKENS, build_llamagen_task
from tests.text.tiny_gemma import save_pair

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = ["train.steps=2", "train.batch_size=4", "train.warmup=0", "train.eval_every=0", "train.save_every=0",
        "train.progress=false"]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ran(out: Path, summary: dict) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert summary["steps"] == 2 and (out / "checkpoints" / "step-2" / "model").is_dir()


def test_the_text_example_distils_a_pair(tiny_text, tmp_path):
    out = tmp_path / "run"
    summary = _example("distil_text").main([str(tiny_text["student"]), str(tiny_text["teacher"]),
                                            str(tiny_text["train"]), "--eval", str(tiny_text["eval"]),
                                            "--out", str(out), "rollout.max_new_tokens=8", *TINY])
    _ran(out, summary)
    assert summary["objective"] == "on_policy" and 0 <= summary["student_after"] <= 1


def test_the_vlm_example_distils_a_pair(vlm_pair, vlm_data, tmp_path):
    pair, out = vlm_pair("llava"), tmp_path / "run"
    summary = _example("distil_vlm").main([str(pair["student"]), str(pair["teacher"]), str(vlm_data["train"]),
                                           "--out", str(out), "rollout.max_new_tokens=4", *TINY])
    _ran(out, summary)


@pytest.mark.usefixtures("one_thread")
def test_the_image_example_distils_a_guided_teacher(tmp_path):
    paths, out = build_llamagen_task(tmp_path / "task"), tmp_path / "run"
    summary = _example("distil_image").main([str(paths["student"]), str(paths["teacher"]), str(paths["train"]),
                                             "--eval", str(paths["eval"]), "--judge", str(paths["judge"]),
                                             "--out", str(out), f"rollout.max_new_tokens={GRID_TOKENS}", *TINY])
    _ran(out, summary)
    assert 0 <= summary["student_after"] <= 1


@pytest.mark.usefixtures("one_thread")
def test_the_gemma_example_prunes_heals_distils_and_measures_before_and_after(tmp_path, capsys):
    pair = save_pair(tmp_path / "pair")  # a tiny Gemma3ForCausalLM in place of the packaged 270M
    out = tmp_path / "run"
    result = _example("distil_gemma").main(["--out", str(out), "--teacher", str(pair["teacher"]), "--keep", "0,2",
                                            "--steps", "2", "--train-prompts", "4", "--held-out", "2",
                                            "--new-tokens", "4", "data.skip_bad=true"])
    student = transformers.AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2 and student.config.layer_types == ["sliding_attention",
                                                                                     "full_attention"]
    for stage in ("heal", "on_policy"):
        assert json.loads((out / "runs" / stage / "summary.json").read_text())["steps"] == 1
    keys = {"reverse_kl", "forward_kl", "health/token_entropy", "health/repeat_share", "task_accuracy"}
    assert keys <= set(result["before"]) and keys <= set(result["after"])
    assert result["before"]["reverse_kl"] > 0 and result["after"]["forward_kl"] > 0
    assert result["after"] != result["before"] and Path(result["plot"]).stat().st_size > 0
    assert json.loads((out / "result.json").read_text())["after"] == result["after"]
    printed = capsys.readouterr().out
    assert "forward KL, teacher's samples" in printed and "sample-health warnings" in printed
