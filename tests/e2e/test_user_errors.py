"""Every user error is one clear line, and a run directory is never mixed or lost: a matrix of bad inputs
and directory reuses, each run through the real CLI entry point (`mmopd.cli.main`, in-process).

Each case asserts the exit code, that no traceback escaped, that the message names the problem, and that
nothing in the run directory was lost or left half-written (no lock, no `.tmp-*`, old files unchanged)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

import mmopd.models.checkpoint as checkpoint
from mmopd.cli import main
from mmopd.run.report import read_metrics
from mmopd.run.schedule import warmup_cosine
from tests.image_tokens.helpers import GRID_TOKENS, build_llamagen_task

pytestmark = pytest.mark.usefixtures("one_thread")


def _base(tiny: dict[str, Path], out: Path) -> dict:
    return {"modality": "text", "student": {"path": str(tiny["student"])}, "teacher": {"path": str(tiny["teacher"])},
            "data": {"train": str(tiny["train"])}, "rollout": {"max_new_tokens": 4},
            "train": {"steps": 2, "batch_size": 2, "save_every": 1, "warmup": 0, "out_dir": str(out),
                      "progress": False}}


def _image_base(task: dict[str, Path], out: Path) -> dict:
    return {"modality": "image_tokens", "student": {"path": str(task["student"])},
            "teacher": {"path": str(task["teacher"])},
            "data": {"train": str(task["train"]), "eval": str(task["eval"]), "judge": str(task["judge"])},
            "rollout": {"max_new_tokens": GRID_TOKENS},
            "train": {"steps": 2, "batch_size": 2, "eval_every": 0, "save_every": 1, "warmup": 0, "out_dir": str(out),
                      "progress": False}}


def _vlm_base(pair: dict[str, Path], data: Path, out: Path) -> dict:
    return {"modality": "vlm", "student": {"path": str(pair["student"])}, "teacher": {"path": str(pair["teacher"])},
            "data": {"train": str(data), "eval": ""}, "rollout": {"max_new_tokens": 3},
            "train": {"steps": 2, "batch_size": 2, "save_every": 1, "warmup": 0, "out_dir": str(out),
                      "progress": False}}


@pytest.fixture(scope="module")
def image_task(tmp_path_factory) -> dict[str, Path]:
    return build_llamagen_task(tmp_path_factory.mktemp("image_task"))


@pytest.fixture(scope="module")
def finished_run(tiny_text, tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoints step-1 and step-2), copied by each case that reuses a directory."""
    out = tmp_path_factory.mktemp("finished") / "run"
    path = out.parent / "config.yaml"
    path.write_text(yaml.safe_dump(_base(tiny_text, out)))
    assert main(["train", str(path)]) == 0
    return out


@dataclass
class Case:
    tmp: Path
    tiny: dict[str, Path]
    template: Path
    image: dict[str, Path] = field(default_factory=dict)  # a tiny image-token task (random models, a judge)
    vlm: dict[str, Path] = field(default_factory=dict)  # a tiny LLaVA pair and its shapes data ("train")
    run: Path = field(init=False)

    def __post_init__(self) -> None:
        self.run = self.tmp / "run"

    def config(self, changes: dict | None = None, name: str = "config.yaml", base: dict | None = None) -> str:
        """The base config (the text task's unless given) with dotted `changes`, written to a file; its path."""
        raw = base or _base(self.tiny, self.run)
        for key, value in (changes or {}).items():
            *sections, last = key.split(".")
            node = raw
            for section in sections:
                node = node.setdefault(section, {})
            node[last] = value
        path = self.tmp / name
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    def image_config(self, changes: dict) -> str:
        return self.config(changes, base=_image_base(self.image, self.run))

    def vlm_config(self, picture: Callable[[Path], None]) -> str:
        """A VLM run on one shapes record whose picture `picture(path)` writes (the other records stay good)."""
        lines = self.vlm["train"].read_text().splitlines()
        first = json.loads(lines[0])
        picture(self.tmp / "picture.png")
        rows = [json.dumps({**first, "images": [str(self.tmp / "picture.png")]})]
        rows += [json.dumps({**(r := json.loads(line)), "images": [str(self.vlm["train"].parent / p)
                                                                  for p in r["images"]]}) for line in lines[1:]]
        data = self.tmp / "vlm.jsonl"
        data.write_text("\n".join(rows) + "\n")
        return self.config(base=_vlm_base(self.vlm, data, self.run))

    def reuse(self) -> None:
        """Put the finished 2-step run in this case's run directory."""
        shutil.copytree(self.template, self.run)
        config = yaml.safe_load((self.run / "config.yaml").read_text())
        config["train"]["out_dir"] = str(self.run)
        (self.run / "config.yaml").write_text(yaml.safe_dump(config))

    def broken_student(self, write: Callable[[Path], None]) -> str:
        copy = self.tmp / "student"
        shutil.copytree(self.tiny["student"], copy)
        write(copy / "model.safetensors")
        return str(copy)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.is_dir() else {}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _unknown_prompt(case: Case) -> str:
    path = case.tmp / "unknown.jsonl"
    path.write_text(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n" + json.dumps({"prompt": "七 加 八"}) + "\n")
    return str(path)


def _eval_with_an_unanswered_record(case: Case) -> str:
    """An eval set of two records, the second without an answer (its accuracy would count only the first)."""
    path = case.tmp / "unanswered.jsonl"
    path.write_text(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    return str(path)


def _png_with_four_rows(path: Path, side: int = 9000) -> None:
    """A side x side grayscale PNG whose (valid, complete) compressed stream holds only its first 4 rows."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = zlib.compress(b"".join(b"\x00" + bytes(side) for _ in range(4)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _symlink_loop(path: Path) -> None:
    path.symlink_to(path.name)


def _image_target_loop(case: Case) -> str:
    (case.tmp / "loop.png").symlink_to("loop.png")
    path = case.tmp / "targets.jsonl"
    path.write_text(json.dumps({"label": 0, "image": "loop.png"}) + "\n")
    return str(path)


def _non_utf8(case: Case) -> str:
    path = case.tmp / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "1+2="}\n{"prompt": "caf\xe9 1+2="}\n')
    return path


def _parquet_without_rows(case: Case) -> str:
    """A parquet file with a schema and no rows (`datasets` fails on it inside its builder)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = case.tmp / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    return str(path)


def _unparseable_csv(case: Case) -> str:
    path = case.tmp / "bad.csv"
    path.write_text('prompt,answer\n"1+2=,3\n')  # a quote that never closes
    return str(path)


def _one_split_folder(case: Case) -> str:
    """A save_to_disk folder of one Dataset (no splits)."""
    import datasets
    path = case.tmp / "one_split"
    datasets.Dataset.from_list([json.loads(line) for line in case.tiny["train"].read_text().splitlines()
                                if line.strip()]).save_to_disk(str(path))
    return str(path)


def _vlm_long_prompt(case: Case) -> str:
    """The VLM shapes data with its second record's prompt repeated past the tiny models' context."""
    rows = [json.loads(line) for line in case.vlm["train"].read_text().splitlines()]
    rows = [{**r, "images": [str(case.vlm["train"].parent / p) for p in r["images"]]} for r in rows]
    rows[1]["prompt"] = " ".join([rows[1]["prompt"]] * 400)
    path = case.tmp / "vlm_long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return case.config(base=_vlm_base(case.vlm, path, case.run))


def _written_with_the_stored_order(case: Case) -> None:
    """The finished run as earlier mmopd wrote it: checkpoints that name no step order (torch.randperm's)."""
    case.reuse()
    for state_file in (case.run / "checkpoints").glob("step-*/trainer_state.pt"):
        state = torch.load(state_file, weights_only=False)
        del state["step_order"]
        torch.save(state, state_file)


def _written_by_two_processes(case: Case) -> None:
    """The finished run as two processes of train.batch_size 2 would have written it: 4 records a step."""
    case.reuse()
    for state_file in (case.run / "checkpoints").glob("step-*/trainer_state.pt"):
        state = torch.load(state_file, weights_only=False)
        state["global_batch"] = 4
        torch.save(state, state_file)


# each case: (argv from a Case, exit code, a pattern the message must hold)
CASES: dict[str, tuple[Callable[[Case], list[str]], int, str]] = {
    # a config value naming something that does not exist
    "unknown_modality": (lambda c: ["train", c.config({"modality": "txt"})], 2, r"modality 'txt' has no adapter"),
    "unknown_key": (lambda c: ["train", c.config({"train.stepz": 3})], 2, r"did you mean 'train\.steps'"),
    "bad_override": (lambda c: ["train", c.config(), "train.steps=-1"], 2, r"train\.steps must be > 0"),
    "unknown_objective": (lambda c: ["train", c.config({"objective.kind": "on_polcy"})], 2,
                          r"did you mean 'on_policy'"),
    "gkd_sampled": (lambda c: ["train", c.config({"objective.kind": "gkd", "objective.estimator": "sampled"})], 2,
                    r"estimator=sampled does not apply to objective\.kind=gkd"),
    "empty_out_dir": (lambda c: ["train", c.config({"train.out_dir": ""})], 2, r"train\.out_dir is empty"),
    "bad_existing": (lambda c: ["train", c.config({"train.existing": "overwrite"})], 2,
                     r"train\.existing is 'overwrite'"),
    "unknown_resume_change": (lambda c: ["train", c.config({"train.resume_changes": ["train.lrr"]})], 2,
                              r"'train\.lrr', which is no config key; did you mean 'train\.lr'"),
    "tracker_not_installed": (lambda c: ["train", c.config({"train.report_to": ["wandb"]})], 2,
                              r"train\.report_to names wandb, which is not installed"),
    "toy_unknown_family": (lambda c: ["toy", "text", str(c.tmp / "toy"), "--family", "llama"], 2,
                           r"family 'llama' is not available"),
    # files a user points at
    "config_is_a_directory": (lambda c: ["train", str(c.tmp)], 2, r"is a directory; pass the YAML file"),
    "config_missing": (lambda c: ["train", str(c.tmp / "nope.yaml")], 2, r"config file not found"),
    "config_not_utf8": (lambda c: ["train", str((c.tmp / "bin.yaml").write_bytes(b"\xff\xfe\x00") and
                                                c.tmp / "bin.yaml")], 2, r"is not a UTF-8 text file"),
    "student_missing": (lambda c: ["train", c.config({"student.path": str(c.tmp / "no-model")})], 2,
                        r"student\.path=.*no-model.*cannot load"),
    "garbage_weights": (lambda c: ["train", c.config({"student.path": c.broken_student(
        lambda p: p.write_bytes(b"garbage" * 100))})], 2, r"student\.path=.*cannot load"),
    "truncated_weights": (lambda c: ["train", c.config({"student.path": c.broken_student(_truncate)})], 2,
                          r"student\.path=.*cannot load"),
    "data_missing": (lambda c: ["train", c.config({"data.train": str(c.tmp / "none.jsonl")})], 2,
                     r"data\.train: file not found"),
    "data_is_a_directory": (lambda c: ["train", c.config({"data.train": str(c.tmp)})], 2,
                            r"data\.train: .* is a folder but not one written by datasets' save_to_disk"),
    "data_not_utf8": (lambda c: ["train", c.config({"data.train": str(_non_utf8(c))})], 2,
                      r"latin1\.jsonl:2: not valid UTF-8"),
    "data_parquet_without_rows": (lambda c: ["train", c.config({"data.train": _parquet_without_rows(c)})], 2,
                                  r"data\.train: .*empty\.parquet holds no usable records \(a parquet file with a "
                                  r"schema and no rows\)"),
    "data_csv_datasets_cannot_parse": (lambda c: ["train", c.config({"data.train": _unparseable_csv(c)})], 2,
                                       r"data\.train: .*bad\.csv cannot be read as a csv file \(ParserError: .*EOF"),
    "eval_split_of_a_jsonl_file": (lambda c: ["train", c.config({"data.eval": str(c.tiny["train"]),
                                                                 "data.eval_split": "validation"})], 2,
                                   r"data\.eval: .*train\.jsonl is one set with no splits, so it has no split "
                                   r"'validation'.*data\.eval_split"),
    "train_split_of_a_save_to_disk_dataset": (lambda c: ["train", c.config({"data.train": _one_split_folder(c),
                                                                            "data.split": "test"})], 2,
                                              r"data\.train: .*one_split is one set with no splits, so it has no "
                                              r"split 'test'.*data\.split"),
    "judge_missing": (lambda c: ["train", c.image_config({"data.judge": str(c.tmp / "no-judge")})], 2,
                      r"data\.judge=.*no-judge holds no judge\.json"),
    "judge_is_a_model": (lambda c: ["train", c.image_config({"data.judge": str(c.image["student"])})], 2,
                         r"data\.judge=.*student holds no judge\.json"),
    "judge_garbage": (lambda c: ["train", c.image_config({"data.judge": str(
        (shutil.copytree(c.image["judge"], c.tmp / "judge"), (c.tmp / "judge" / "judge.safetensors").write_bytes(
            b"garbage"), c.tmp / "judge")[2])})], 2, r"data\.judge=.*judge is not a readable judge"),
    "vlm_picture_symlink_loop": (lambda c: ["train", c.vlm_config(_symlink_loop)], 2,
                                 r"vlm\.jsonl:1: bad record: image path .*picture\.png cannot be resolved: "
                                 r"Symlink loop"),
    "image_target_symlink_loop": (lambda c: ["train", c.image_config({"data.train": _image_target_loop(c),
                                                                       "objective.kind": "sft"})], 2,
                                  r"targets\.jsonl:1: bad record: 'image' must be the path of a picture .*'loop\.png'"
                                  r" is not a file"),
    # data that reads as nothing
    "prompt_all_unknown_tokens": (lambda c: ["train", c.config({"data.train": _unknown_prompt(c)})], 2,
                                  r"unknown\.jsonl:2: the prompt is \d+ tokens, every one unknown \(<unk>\) to the "
                                  r"student's tokenizer"),
    "vlm_png_with_four_rows_of_data": (lambda c: ["train", c.vlm_config(_png_with_four_rows)], 2,
                                       r"vlm\.jsonl:1: bad record: image .*picture\.png is 9000x9000, but its data "
                                       r"stops [\d,]+ bytes short \(a truncated PNG"),
    "vlm_prompt_longer_than_the_context": (lambda c: ["train", _vlm_long_prompt(c)], 2,
                                           r"vlm_long\.jsonl:2: the prompt is \d+ tokens, and with "
                                           r"rollout\.max_new_tokens=3 it exceeds the models' context of \d+ tokens"),
    "eval_record_without_an_answer": (lambda c: ["train", c.config({"data.eval": _eval_with_an_unanswered_record(c)})],
                                      2, r"unanswered\.jsonl:2: bad record: no 'answer' to score the response "
                                         r"against; every data\.eval record needs one"),
    "eval_command_on_a_record_without_an_answer": (
        lambda c: ["eval", c.config({"data.eval": _eval_with_an_unanswered_record(c)})], 2,
        r"unanswered\.jsonl:2: bad record: no 'answer'"),
    "image_toy_wrong_max_new_tokens": (lambda c: ["train", c.image_config({"rollout.max_new_tokens": 20})], 2,
                                       r"rollout\.max_new_tokens=20, but every picture of this model "
                                       rf"is .* = {GRID_TOKENS} tokens; set rollout\.max_new_tokens={GRID_TOKENS}"),
    "out_dir_under_a_file": (lambda c: ["train", c.config({"train.out_dir": str(c.tiny["train"] / "run")})], 2,
                             r"is not a writable directory"),
    # a directory reused
    "resume_with_new_lr": (lambda c: (c.reuse(), ["train", c.config({"train.lr": 1e-3, "train.steps": 3})])[1], 2,
                           r"different config: train\.lr 0\.0001 -> 0\.001.*train\.resume_changes=\[train\.lr\]"),
    "resume_with_new_batch_and_objective": (
        lambda c: (c.reuse(), ["train", c.config({"train.batch_size": 4, "objective.kind": "supervised_kd"})])[1], 2,
        r"different config: objective\.kind 'on_policy' -> 'supervised_kd'\. "),  # the batch layout may change
    "resume_with_a_new_global_batch": (
        lambda c: (c.reuse(), ["train", c.config({"train.batch_size": 4, "train.steps": 3})])[1], 2,
        r"global batch of 2 records a step, and this run's is 4 .* a resumed run keeps the global batch"),
    "resume_on_fewer_processes_at_the_same_batch_size": (  # a machine of two is gone: one process goes on
        lambda c: (_written_by_two_processes(c), ["train", c.config({"train.steps": 3})])[1], 2,
        r"global batch of 4 records a step, and this run's is 2 \(train\.batch_size 2 × train\.grad_accum 1 × 1 "
        r"process\); a resumed run keeps the global batch: on 1 process, set train\.batch_size × "
        r"train\.grad_accum to 4"),
    "resume_a_checkpoint_of_the_stored_step_order": (
        lambda c: (_written_with_the_stored_order(c), ["train", c.config({"train.steps": 3})])[1], 2,
        r"step-2 was written with the stored torch\.randperm step order of earlier mmopd, .* cannot resume exactly"),
    "resume_with_new_student_even_if_asked": (
        lambda c: (c.reuse(), ["train", c.config({"student.path": str(c.tiny["teacher"]),
                                                  "train.resume_changes": ["student.path"]})])[1], 2,
        r"student\.path cannot change on resume"),
    "fewer_steps_than_done": (lambda c: (c.reuse(), ["train", c.config({"train.steps": 1})])[1], 2,
                              r"train\.steps=1 is fewer than the 2 steps"),
    "new_run_in_a_used_directory": (lambda c: (c.reuse(), ["train", c.config({"train.resume": "never"})])[1], 2,
                                    r"already holds a run.*train\.existing=move_aside"),
    "directory_in_use_on_another_machine": (  # its pid cannot be checked from here: never taken over
        lambda c: (c.reuse(), (c.run / ".lock").write_text("4242 gpu-node-7\n"),
                   ["train", c.config({"train.steps": 3})])[2],
        2, r"in use by another run \(pid 4242 on gpu-node-7, .*\); .* if that run is gone \(its machine died\), "
           r"delete .*\.lock"),
    "directory_in_use": (lambda c: (c.reuse(), (c.run / ".lock").write_text(f"{os.getppid()}\n"),
                                    ["train", c.config({"train.steps": 3})])[2], 2,
                         rf"in use by another run \(pid {os.getppid()}"),
    "every_checkpoint_broken": (lambda c: (c.reuse(), [(p / "trainer_state.pt").unlink()
                                                       for p in (c.run / "checkpoints").iterdir()],
                                           ["train", c.config({"train.steps": 3})])[2], 2,
                                r"no checkpoint .* can be resumed: .*step-2 is unusable \(trainer_state\.pt is "
                                r"missing\).*step-1 is unusable"),
    "vllm_checkpoint_into_a_run": (lambda c: (c.reuse(), ["vllm-checkpoint", c.config(), str(c.run)])[1], 2,
                                   r"run is not empty and is no engine checkpoint that mmopd wrote .*nothing was "
                                   r"deleted"),
    "toy_into_a_used_directory": (lambda c: (c.reuse(), ["toy", "text", str(c.run)])[1], 2,
                                  r"is not empty; .*--force"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_input_or_reuse_is_one_line_and_loses_nothing(name, tiny_text, finished_run, image_task, vlm_pair,
                                                            vlm_data, tmp_path, capsys):
    case = Case(tmp_path, tiny_text, finished_run, image_task, {**vlm_pair("llava"), "train": vlm_data["train"]})
    build, code, pattern = CASES[name]
    argv = build(case)
    before = _snapshot(case.run)
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("mmopd: error:")]
    assert len(message) == 1 and re.search(pattern, message[0]), err
    assert _snapshot(case.run) == before  # nothing lost, nothing half-written, no lock left behind


# reuses that succeed: the run continues or starts cleanly, and the directory says what ran

def _rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_more_steps_continue_the_run_and_config_yaml_says_what_ran(tiny_text, finished_run, tmp_path, capsys):
    case = Case(tmp_path, tiny_text, finished_run)
    case.reuse()
    assert main(["train", case.config({"train.steps": 3})]) == 0
    assert [r["step"] for r in _rows(case.run)] == [1, 2, 3]
    assert yaml.safe_load((case.run / "config.yaml").read_text())["train"]["steps"] == 3
    segments = [json.loads(line) for line in (case.run / "segments.jsonl").read_text().splitlines()]
    assert [s["from_step"] for s in segments] == [0, 2]
    assert segments[1]["changes"]["train.steps"] == [2, 3]
    assert not (case.run / ".lock").exists()


def test_resume_changes_applies_a_new_lr_for_real_and_logs_it(tiny_text, finished_run, tmp_path, caplog):
    case = Case(tmp_path, tiny_text, finished_run)
    case.reuse()
    argv = ["train", case.config({"train.steps": 4}), "train.lr=0.001", "train.resume_changes=[train.lr]"]
    assert main(argv) == 0
    assert "train.lr changed: 0.0001 -> 0.001" in caplog.text
    rows = _rows(case.run)
    assert rows[0]["lr"] == pytest.approx(1e-4 * warmup_cosine(0, 2)(1))
    assert [r["lr"] for r in rows[2:]] == pytest.approx([1e-3 * warmup_cosine(0, 4)(s) for s in (3, 4)])
    state = torch.load(case.run / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=False)
    assert state["config"]["train"]["lr"] == 1e-3
    assert yaml.safe_load((case.run / "config.yaml").read_text())["train"]["lr"] == 1e-3


def test_the_same_steps_again_trains_nothing_says_so_and_exits_zero(tiny_text, finished_run, tmp_path, caplog):
    case = Case(tmp_path, tiny_text, finished_run)
    case.reuse()
    before = _snapshot(case.run)
    assert main(["train", case.config()]) == 0
    assert "already did all 2 steps; nothing to train" in caplog.text
    assert _snapshot(case.run) == before


def test_a_finished_run_of_the_stored_step_order_still_says_it_is_done(tiny_text, finished_run, tmp_path, caplog):
    case = Case(tmp_path, tiny_text, finished_run)
    _written_with_the_stored_order(case)  # no batch is read again, so the order does not matter
    assert main(["train", case.config()]) == 0
    assert "already did all 2 steps; nothing to train" in caplog.text


def test_move_aside_keeps_the_old_run_whole_and_starts_a_new_one(tiny_text, finished_run, tmp_path):
    case = Case(tmp_path, tiny_text, finished_run)
    case.reuse()
    before = _snapshot(case.run)
    assert main(["train", case.config({"train.resume": "never", "train.existing": "move_aside",
                                       "train.keep_last": 1, "train.steps": 1})]) == 0
    assert _snapshot(tmp_path / "run.old-1") == before
    assert [p.name for p in checkpoint.complete_checkpoints(case.run)] == ["step-1"]
    assert [r["step"] for r in _rows(case.run)] == [1]


def test_keep_last_deletes_only_the_current_runs_checkpoints(tiny_text, tmp_path):
    model = torch.nn.Linear(1, 1)
    model.save_pretrained = lambda path: (Path(path).mkdir(parents=True), (Path(path) / "config.json").write_text("{}"))
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, model, None, {"step": step}, run_id="old")
    for step in (3, 4, 5):
        checkpoint.save_checkpoint(tmp_path, step, model, None, {"step": step}, keep_last=1, run_id="new")
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-1", "step-2", "step-5"]


def test_a_stale_lock_and_a_torn_temp_dir_are_cleaned_up(tiny_text, finished_run, tmp_path, caplog):
    case = Case(tmp_path, tiny_text, finished_run)
    case.reuse()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (case.run / ".lock").write_text(dead.stdout)
    (case.run / "checkpoints" / ".tmp-step-3-999").mkdir()
    assert main(["train", case.config({"train.steps": 3})]) == 0
    assert "no longer running" in caplog.text
    assert sorted(p.name for p in (case.run / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    assert not (case.run / ".lock").exists()


@pytest.mark.parametrize("damage", ["missing_state", "truncated_weights"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_valid_one(damage, tiny_text, finished_run, tmp_path,
                                                                       caplog):
    case = Case(tmp_path, tiny_text, finished_run)
    case.reuse()
    newest = case.run / "checkpoints" / "step-2"
    if damage == "missing_state":
        (newest / "trainer_state.pt").unlink()
    else:
        _truncate(newest / "model" / "model.safetensors")
    assert main(["train", case.config({"train.steps": 3})]) == 0
    assert "resuming from step-1 instead" in caplog.text
    assert ("trainer_state.pt is missing" if damage == "missing_state" else "model/model.safetensors") in caplog.text
    assert [r["step"] for r in _rows(case.run)] == [1, 2, 3]


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_says_so(tiny_text, tmp_path, capsys, monkeypatch):
    case = Case(tmp_path, tiny_text, tmp_path)
    real = checkpoint.torch.save

    def full_disk(obj, path):
        if "step-2" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    assert main(["train", case.config()]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err
    assert f"the previous checkpoint {case.run / 'checkpoints' / 'step-1'} is intact" in err
    assert sorted(p.name for p in (case.run / "checkpoints").iterdir()) == ["step-1"]
    assert not (case.run / ".lock").exists()



def test_a_full_disk_during_the_weight_write_keeps_the_previous_checkpoint_and_every_metrics_line(
        tiny_text, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils as modeling_utils
    case = Case(tmp_path, tiny_text, tmp_path)
    real = modeling_utils.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "step-2" in str(filename):
            Path(filename).write_bytes(b"\0" * 64)  # a part written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    assert main(["train", case.config()]) == 1
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("mmopd: stopped:")]
    assert "Traceback" not in err and len(message) == 1 and "No space left on device" in message[0]
    assert f"the previous checkpoint {case.run / 'checkpoints' / 'step-1'} is intact" in message[0]
    assert [p.name for p in checkpoint.complete_checkpoints(case.run)] == ["step-1"]
    assert sorted(p.name for p in (case.run / "checkpoints").iterdir()) == ["step-1"]
    assert [r["step"] for r in _rows(case.run)] == [1, 2]  # step 2's row was logged before its checkpoint
    assert not (case.run / ".lock").exists()


@pytest.mark.parametrize("fault", ["half_a_line_written", "fsync"])
def test_a_full_disk_during_a_metrics_append_tears_no_line_and_the_rerun_loses_none(fault, tiny_text, tmp_path,
                                                                                   capsys, monkeypatch):
    """The disk fills in the middle of step 2's row (half of it reaches the file), or at its fsync (the line is
    written, but not safely): either way the file keeps whole lines only, and the rerun logs step 2 once."""
    case = Case(tmp_path, tiny_text, tmp_path)
    metrics = case.run / "metrics.jsonl"
    real = {"write": os.write, "fsync": os.fsync}
    name = "write" if fault == "half_a_line_written" else "fsync"

    def step_2s_row(fd: int, data: tuple) -> bool:  # the data written, or for fsync the file as written so far
        return os.path.realpath(f"/proc/self/fd/{fd}") == str(metrics.resolve()) and \
            b'"step": 2,' in (bytes(data[0]) if data else metrics.read_bytes())

    def full_disk(fd, *data):
        if step_2s_row(fd, data):
            if data:
                real["write"](fd, bytes(data[0])[: len(data[0]) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real[name](fd, *data)

    monkeypatch.setattr(os, name, full_disk)
    assert main(["train", case.config()]) == 1
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("mmopd: stopped:")]
    assert "Traceback" not in err and len(message) == 1, err
    assert "metrics.jsonl" in message[0] and "No space left on device" in message[0]
    assert f"the previous checkpoint {case.run / 'checkpoints' / 'step-1'} is intact" in message[0]
    lines = metrics.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and [r["step"] for r in _rows(case.run)] == [1]
    assert not (case.run / ".lock").exists()
    monkeypatch.setattr(os, name, real[name])
    assert main(["train", case.config()]) == 0  # the rerun resumes from step-1 and logs step 2
    assert [r["step"] for r in _rows(case.run)] == [1, 2]

def test_skip_bad_skips_a_non_utf8_line_with_its_place(tiny_text, tmp_path, caplog):
    case = Case(tmp_path, tiny_text, tmp_path)
    assert main(["train", case.config({"data.train": str(_non_utf8(case)), "data.skip_bad": True,
                                       "train.steps": 1})]) == 0
    assert "latin1.jsonl:2: not valid UTF-8" in caplog.text
    assert json.loads((case.run / "summary.json").read_text())["skipped_records"] == 1


def test_off_a_terminal_progress_is_plain_lines_not_a_redrawn_bar(tiny_text, tmp_path):
    case = Case(tmp_path, tiny_text, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mmopd.cli", "train", case.config({"train.progress": True})],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "Traceback" not in proc.stderr
    assert "step 2/2 loss" in proc.stderr


def test_a_run_directory_whose_write_probe_fails_is_one_line_and_keeps_no_probe(tiny_text, tmp_path, capsys,
                                                                              monkeypatch):
    case = Case(tmp_path, tiny_text, tmp_path)
    real = Path.write_text

    def full_disk(path, *args, **kwargs):
        if path.name.startswith(".write-test-"):
            real(path, "")  # the file is made, then its write fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main(["train", case.config()]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is not a writable directory (No space left on device)" in err
    assert list(case.run.iterdir()) == []


@pytest.mark.parametrize("left", [["step-1"], []])
def test_a_rerun_moves_the_rows_it_logs_again_aside_and_deletes_none(left, tiny_text, finished_run, tmp_path):
    """A crash after step 2's rows, before its checkpoint (or before any checkpoint): the rerun logs those steps
    again, and the earlier segment's rows go to metrics.superseded.jsonl."""
    case = Case(tmp_path, tiny_text, finished_run)
    case.reuse()
    earlier = (case.run / "metrics.jsonl").read_text().splitlines()
    for step in ("step-1", "step-2"):
        if step not in left:  # a checkpoint write that never finished: removed at the next start
            (case.run / "checkpoints" / step).rename(case.run / "checkpoints" / f".tmp-{step}-999")
    assert main(["train", case.config()]) == 0
    assert [r["step"] for r in _rows(case.run)] == [1, 2]
    moved = (case.run / "metrics.superseded.jsonl").read_text().splitlines()
    assert moved == [line for line in earlier if json.loads(line)["step"] > (1 if left else -1)]


def test_a_torn_summary_is_written_again_whole_not_a_traceback(tiny_text, finished_run, tmp_path, capsys, caplog):
    case = Case(tmp_path, tiny_text, finished_run)
    case.reuse()
    _truncate(case.run / "summary.json")  # a crash while it was written
    assert main(["train", case.config()]) == 0
    assert "Traceback" not in capsys.readouterr().err and "summary.json is unreadable" in caplog.text
    assert json.loads((case.run / "summary.json").read_text())["steps"] == 2


def test_a_training_file_replaced_before_the_resume_is_refused_unless_listed(tiny_text, tmp_path, capsys, caplog):
    """Same path, other rows: the resumed steps would read records the run never started on, and the step order
    (a permutation of the set's size) would shift, without a word. The checkpoint names the set it trained on."""
    case = Case(tmp_path, tiny_text, tmp_path)
    data = tmp_path / "train.jsonl"
    rows = tiny_text["train"].read_text().splitlines()
    data.write_text("\n".join(rows) + "\n")
    assert main(["train", case.config({"data.train": str(data), "train.steps": 1})]) == 0
    data.write_text("\n".join(reversed(rows)) + "\n")  # replaced by other rows (here, the same ones reordered)
    before = _snapshot(case.run)
    assert main(["train", case.config({"data.train": str(data), "train.steps": 2})]) == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("mmopd: error:")]
    assert "Traceback" not in err and len(message) == 1, err
    assert re.search(r"data\.train=.*train\.jsonl holds other records than step-1 was trained on \(sha256:\w+ -> "
                     r"sha256:\w+\).*train\.resume_changes=\[data\.train\]", message[0]), message[0]
    assert _snapshot(case.run) == before
    assert main(["train", case.config({"data.train": str(data), "train.steps": 2,
                                       "train.resume_changes": ["data.train"]})]) == 0
    assert "holds other records than step-1 was trained on" in caplog.text
    assert [r["step"] for r in _rows(case.run)] == [1, 2]


def test_a_full_disk_while_a_rerun_moves_rows_aside_keeps_both_files_whole(tiny_text, finished_run, tmp_path,
                                                                           capsys, monkeypatch):
    """The rerun of a run whose step-2 checkpoint never finished moves step 2's rows to metrics.superseded.jsonl;
    the disk fills at that append's fsync: neither file is changed, and the next rerun moves the rows once."""
    case = Case(tmp_path, tiny_text, finished_run)
    case.reuse()
    (case.run / "checkpoints" / "step-2").rename(case.run / "checkpoints" / ".tmp-step-2-999")
    earlier = (case.run / "metrics.jsonl").read_text()
    superseded, real = case.run / "metrics.superseded.jsonl", os.fsync

    def full_disk(fd):
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(superseded.resolve()):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    assert main(["train", case.config()]) == 1
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("mmopd: stopped:")]
    assert "Traceback" not in err and len(message) == 1 and "No space left on device" in message[0], err
    assert (case.run / "metrics.jsonl").read_text() == earlier and not superseded.exists()
    assert not (case.run / "metrics.tmp").exists() and not (case.run / ".lock").exists()
    monkeypatch.setattr(os, "fsync", real)
    assert main(["train", case.config()]) == 0
    assert [r["step"] for r in _rows(case.run)] == [1, 2]
    assert [json.loads(line)["step"] for line in superseded.read_text().splitlines()] == [2]
