"""Configs: YAML plus dotted overrides, and errors that name the key and what to do."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest

from mmopd.config import ConfigError, load_config
from mmopd.run.trainer import _collective_timeout

REQUIRED = {"student.path": "s", "teacher.path": "t", "data.train": "train.jsonl"}


def test_yaml_and_dotted_overrides_build_typed_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modality: text\nstudent: {path: s}\nteacher: {path: t}\ndata: {train: d.jsonl}\n"
                    "train: {steps: 10, lr: 1.0e-3}\n")
    config = load_config(path, ["train.steps=50", "rollout.temperature=0.7", "train.report_to=[tensorboard]"])
    assert config.train.steps == 50 and config.train.lr == 1e-3
    assert config.rollout.temperature == 0.7
    assert config.train.report_to == ["tensorboard"]
    assert config.objective.kind == "on_policy"  # defaults fill the rest


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.step'.*did you mean 'train.steps'"):
        load_config(None, {**REQUIRED, "train.step": 5})
    with pytest.raises(ConfigError, match=r"unknown config key 'rolout'.*did you mean 'rollout'"):
        load_config(None, {**REQUIRED, "rolout.temperature": 1.0})


@pytest.mark.parametrize("key,value,message", [
    ("train.steps", "many", "train.steps must be an integer"),
    ("train.steps", -3, "train.steps must be > 0"),
    ("train.lr", "fast", "train.lr must be a number"),
    ("train.progress", "yes", "train.progress must be true or false"),
    ("objective.kind", "on_policyy", "did you mean 'on_policy'"),
    ("objective.beta", 1.5, r"objective.beta must lie in \[0, 1\]"),
    ("rollout.top_p", 0.0, "rollout.top_p must be > 0"),
])
def test_wrong_values_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**REQUIRED, key: value})


def test_missing_paths_and_estimator_mismatch_are_errors():
    with pytest.raises(ConfigError, match="student.path is required"):
        load_config(None, {"teacher.path": "t", "data.train": "d"})
    with pytest.raises(ConfigError, match="teacher.path is required for objective.kind=on_policy"):
        load_config(None, {"student.path": "s", "data.train": "d"})
    assert load_config(None, {"student.path": "s", "data.train": "d", "objective.kind": "sft"}).teacher.path == ""
    with pytest.raises(ConfigError, match="estimates the reverse KL only"):
        load_config(None, {**REQUIRED, "objective.estimator": "sampled", "objective.divergence": "jsd"})


def test_malformed_override_and_missing_file_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_data_fields_is_a_mapping_of_strings_from_yaml_or_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student: {path: s}\nteacher: {path: t}\ndata: {train: t.parquet, fields: {prompt: question, answer: solution}}\n")
    config = load_config(path, ["data.fields.images=image"])
    assert config.data.fields == {"prompt": "question", "answer": "solution", "images": "image"}
    with pytest.raises(ConfigError, match="data.fields must be a mapping, got 'question'"):
        load_config(None, {"student.path": "s", "teacher.path": "t", "data.train": "t", "data.fields": "question"})


def test_a_rollout_server_on_another_machine_needs_a_sync_dir_it_reads():
    served = {**REQUIRED, "rollout.engine": "vllm"}
    with pytest.raises(ConfigError, match=r"rollout.url=http://gpu-node:8000 names another machine, .* /dev/shm: set "
                                          r"rollout.sync_dir to a folder that machine reads at the same path"):
        load_config(None, {**served, "rollout.url": "http://gpu-node:8000"})
    assert load_config(None, {**served, "rollout.url": "http://gpu-node:8000", "rollout.sync_dir": "/shared/sync"})
    for here in ("http://127.0.0.1:8000", "http://localhost:8000", f"http://{socket.gethostname()}:8000"):
        assert load_config(None, {**served, "rollout.url": here}).rollout.sync_dir == ""  # /dev/shm, read there too


@pytest.mark.parametrize("seconds", [600, 5.0, 1800])
def test_the_collective_timeout_reaches_the_process_group_whatever_its_value(seconds):
    assert load_config(None, {**REQUIRED, "train.collective_timeout": seconds}).train.collective_timeout == seconds
    # accelerate's handler passes on only what differs from its NCCL default, 600 s: gloo's own is 1800 s
    assert _collective_timeout(seconds).to_kwargs() == {"timeout": timedelta(seconds=seconds)}
    with pytest.raises(ConfigError, match="train.collective_timeout must be > 0"):
        load_config(None, {**REQUIRED, "train.collective_timeout": 0})
