"""The config schema is defined once: resume roles on the fields (the run directory derives its key sets from them),
one engine section shared by the rollout and the teacher, and a modality's own keys declared and checked by it."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from mmopd import config as schema
from mmopd.config import (RESUME_ROLES, Config, ConfigError, EngineSettings, ModalityOptions, RolloutConfig,
                          TeacherConfig, _build_config, check_modality_options, config_keys, load_config,
                          modality_options, register_modality_options, resume_keys)
from mmopd.run import rundir
from mmopd.run.session import Session

ROOT = Path(__file__).resolve().parents[2]
BASE = {"student.path": "s", "teacher.path": "t", "data.train": "d.jsonl"}

# the key sets rundir.py listed as strings before they were derived from the fields, kept here once as literals
# (and the safe keys added since: train.collective_timeout)
OLD_SAFE_TO_CHANGE = frozenset({
    "train.steps", "train.save_every", "train.keep_last", "train.eval_every", "train.eval_batch_size",
    "train.log_every", "train.progress", "train.report_to", "train.out_dir", "train.resume", "train.existing",
    "train.resume_changes", "data.eval", "data.eval_limit", "data.judge", "train.collective_timeout"})
OLD_LAYOUT = frozenset({"train.batch_size", "train.grad_accum", "train.sharding", "teacher.sharding",
                        "train.fsdp_cpu_offload"})
OLD_FIXED = frozenset({"modality", "student.path", "student.trainable", "student.lora_rank", "student.lora_alpha"})


def _sections(cls: type = Config) -> list[type]:
    """Config and every section class below it (the engine section through its subclasses)."""
    found = [cls]
    for hint in typing.get_type_hints(cls).values():
        for inner in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(inner) and inner not in found:
                found += [c for c in _sections(inner) if c not in found]
    return found


def test_the_derived_resume_key_sets_reproduce_the_lists_rundir_held():
    assert rundir.SAFE_TO_CHANGE == OLD_SAFE_TO_CHANGE
    assert rundir.LAYOUT == OLD_LAYOUT
    assert rundir.FIXED == OLD_FIXED


def test_every_config_field_declares_a_resume_role_and_rundir_derives_its_sets_from_them():
    classes = _sections()
    assert EngineSettings in TeacherConfig.__mro__ and RolloutConfig in classes
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("resume") in RESUME_ROLES, f"{cls.__name__}.{f.name} declares no resume role"
    assert (rundir.SAFE_TO_CHANGE, rundir.LAYOUT, rundir.FIXED) == tuple(map(resume_keys, ("safe", "layout", "fixed")))
    roles = [resume_keys(role) for role in RESUME_ROLES]
    assert frozenset().union(*roles) == config_keys() and sum(map(len, roles)) == len(config_keys())
    with pytest.raises(ValueError, match="resume role 'sometimes' is not one of run, safe, layout, fixed"):
        resume_keys("sometimes")


def test_config_keys_are_the_dotted_keys_of_every_section():
    keys = config_keys()
    assert {"modality", "student.path", "teacher.url", "rollout.url", "rollout.sync_dir",
            "train.eval_kl_prompts"} <= keys
    assert "teachers" not in keys and "teacher" not in keys  # the list form of `teacher` is no key of its own
    with pytest.raises(ConfigError, match="train.resume_changes names 'rollout.engin', which is no config key; did "
                                          "you mean 'rollout.engine'"):
        load_config(None, {**BASE, "train.resume_changes": ["rollout.engin"]})


def test_rollout_and_teacher_share_one_engine_section_with_the_same_flat_keys():
    shared = [f.name for f in dataclasses.fields(EngineSettings)]
    assert shared == ["engine", "url", "gpu_memory_utilization", "timeout", "retries"]
    for cls in (RolloutConfig, TeacherConfig):
        assert issubclass(cls, EngineSettings)
        assert [f.name for f in dataclasses.fields(cls)][:len(shared)] == shared


def test_the_engine_keys_load_as_dotted_overrides_and_as_nested_yaml(tmp_path):
    settings = {"engine": "vllm", "url": "http://127.0.0.1:8001", "timeout": 30.0, "retries": 1,
                "gpu_memory_utilization": 0.5}
    dotted = load_config(None, {**BASE, **{f"rollout.{k}": v for k, v in settings.items()},
                                **{f"teacher.{k}": v for k, v in settings.items()},
                                "teacher.top_k": 4, "objective.estimator": "full"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"student": {"path": "s"}, "data": {"train": "d.jsonl"},
                                    "teacher": {"path": "t", "top_k": 4, **settings}, "rollout": settings}))
    nested = load_config(path)
    for config in (dotted, nested):
        for side in (config.rollout, config.teacher):
            assert {k: getattr(side, k) for k in settings} == settings
    assert dotted.to_dict() == nested.to_dict()
    assert nested.to_dict()["rollout"]["url"] == "http://127.0.0.1:8001"  # saved flat, as written


@pytest.mark.parametrize("side, verb", [("rollout", "samples"), ("teacher", "scores")])
def test_the_shared_engine_checks_name_their_section(side, verb):
    with pytest.raises(ConfigError, match=f"^{side}.url is set, but {side}.engine=hf {verb} in-process; set "
                                          f"{side}.engine=vllm"):
        load_config(None, {**BASE, f"{side}.url": "http://127.0.0.1:8000"})
    with pytest.raises(ConfigError, match=f"^{side}.engine is 'vlm', which is not one of hf, vllm; did you mean"):
        load_config(None, {**BASE, f"{side}.engine": "vlm"})
    with pytest.raises(ConfigError, match=rf"^{side}.gpu_memory_utilization must lie in \(0, 1\], got 1.5$"):
        load_config(None, {**BASE, f"{side}.engine": "vllm", f"{side}.gpu_memory_utilization": 1.5,
                           "teacher.top_k": 4})


def test_the_readme_and_the_shipped_configs_load_unchanged():
    readme = (ROOT / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    configs = [b for b in blocks if isinstance(b, dict) and set(b) & {"student", "teacher", "data", "train"}]
    assert len(configs) >= 3
    for raw in configs:
        _build_config(raw)  # every key the README documents is a key of the schema
    shipped = sorted((ROOT / "configs").glob("*.yaml"))
    assert shipped
    for path in shipped:
        if "modality" in yaml.safe_load(path.read_text()):
            load_config(path)


def test_a_modality_declares_its_trainable_modes_and_others_refuse_them():
    import modalities.vlm  # noqa: F401  (registers its options)

    vlm = load_config(None, {**BASE, "modality": "vlm", "student.trainable": "lm_only"})
    assert modality_options("vlm").trainable == ("lm_only",)
    check_modality_options(vlm, training=True)
    text = load_config(None, {**BASE, "student.trainable": "lm_only"})  # the text modality declares no lm_only
    with pytest.raises(ConfigError, match="^student.trainable=lm_only is not supported by the text adapter; use full "
                                          "or lora$"):
        check_modality_options(text, training=True)
    check_modality_options(text, training=False)  # evaluation does not train: the mode does not matter
    with pytest.raises(ConfigError, match=r"use full, lora or lm_only \(did you mean 'lm_only'\?\)$"):
        check_modality_options(load_config(None, {**BASE, "modality": "vlm", "student.trainable": "lm_onyl"}), True)


def test_the_image_modality_checks_its_judge_and_guidance():
    import modalities.image_tokens  # noqa: F401  (registers its options)

    options = modality_options("image_tokens")
    assert options.guidance and not modality_options("text").guidance
    image = {**BASE, "modality": "image_tokens", "data.eval": "e.jsonl"}
    with pytest.raises(ConfigError, match="set data.judge"):
        check_modality_options(load_config(None, image), training=True)
    guided = load_config(None, {**image, "data.judge": "j", "teacher.cfg_scale": -1.0})  # the core leaves it alone
    with pytest.raises(ConfigError, match=r"^teacher.cfg_scale must be >= 0, got -1.0$"):
        check_modality_options(guided, training=True)


def test_a_new_modality_registers_its_own_check():
    seen = []

    def check(config: Config) -> None:
        seen.append(config.data.judge)
        if config.data.judge != "ok":
            raise ConfigError(f"data.judge={config.data.judge!r}: the sketch modality wants 'ok'")

    register_modality_options("sketch", ModalityOptions(trainable=("strokes_only",), check=check))
    try:
        config = load_config(None, {**BASE, "modality": "sketch", "student.trainable": "strokes_only",
                                    "data.judge": "ok"})
        assert check_modality_options(config, training=True).trainable == ("strokes_only",)
        config.data.judge = "no"
        with pytest.raises(ConfigError, match="the sketch modality wants 'ok'"):
            check_modality_options(config, training=True)
        assert seen == ["ok", "no"]
    finally:
        schema._MODALITY_OPTIONS.pop("sketch")


def test_the_session_runs_the_modality_check_before_anything_loads(text_config, monkeypatch):
    def check(config: Config) -> None:
        raise ConfigError(f"the text modality's own check saw student.path={Path(config.student.path).name}")

    monkeypatch.setitem(schema._MODALITY_OPTIONS, "text", ModalityOptions(check=check))
    with pytest.raises(ConfigError, match="^the text modality's own check saw student.path=student$"):
        Session(text_config())
