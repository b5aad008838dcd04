"""The real-checkpoint VLM recipes in configs/ stay runnable: each loads, names hub checkpoints, and runs
a step with tiny local models of the same family swapped in for the hub ids."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import mmopd
from mmopd.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
RECIPES = {  # recipe -> (student hub id, teacher hub id, the family of both)
    "qwen2_5_vl_7b_to_3b.yaml": ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"),
    "smolvlm_500m_to_256m.yaml": ("HuggingFaceTB/SmolVLM-256M-Instruct", "HuggingFaceTB/SmolVLM-500M-Instruct",
                                  "smolvlm"),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_runs_a_step_with_tiny_models_of_its_family(recipe, vlm_pair, vlm_data, tmp_path):
    student_id, teacher_id, family = RECIPES[recipe]
    config = load_config(CONFIGS / recipe)
    assert (config.modality, config.student.path, config.teacher.path) == ("vlm", student_id, teacher_id)
    tiny = vlm_pair(family)
    config = load_config(CONFIGS / recipe, [
        f"student.path={tiny['student']}", f"teacher.path={tiny['teacher']}", f"data.train={vlm_data['train']}",
        "data.eval=", "rollout.max_new_tokens=3", "train.steps=1", "train.batch_size=2", "train.grad_accum=1",
        f"train.out_dir={tmp_path / 'run'}", "train.progress=false"])
    summary = mmopd.train(config)
    assert summary["steps"] == 1
    step = tmp_path / "run" / "checkpoints" / "step-1"
    assert (step / "model" / "config.json").is_file()
    if config.student.trainable == "lora":  # the adapters trained (B starts at zero), checkpointing or not
        adapters = load_file(str(step / "lora" / "adapter_model.safetensors"))
        assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)


@pytest.mark.slow
def test_the_sharded_recipe_trains_two_steps_on_two_processes_with_tiny_models_of_its_family(vlm_pair, vlm_data,
                                                                                             tmp_path):
    recipe = CONFIGS / "qwen2_5_vl_7b_to_3b_fsdp.yaml"
    config = load_config(recipe)
    assert (config.train.sharding, config.teacher.sharding, config.student.trainable) == ("fsdp", "fsdp", "full")
    tiny = vlm_pair("qwen2_5_vl")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    proc = subprocess.run([launcher, "launch", "--config_file", str(CONFIGS / "accelerate/ddp_cpu_2proc.yaml"),
                           "--main_process_port", port, "-m", "mmopd.cli", "train", str(recipe),
                           f"student.path={tiny['student']}", f"teacher.path={tiny['teacher']}",
                           f"data.train={vlm_data['train']}", "data.eval=", "rollout.max_new_tokens=3",
                           "train.steps=2", "train.batch_size=1", f"train.out_dir={tmp_path / 'run'}",
                           "train.progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "model" / "config.json").is_file()
