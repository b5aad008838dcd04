"""The shapes-VQA toy: pictures show what the questions ask about, every answer is right and unique,
eval pictures are held out, and `mmopd toy vlm` writes a loadable config with absolute paths."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from mmopd.config import load_config
from modalities.vlm import shapes, toy
from modalities.vlm.families import build_family_model
from modalities.vlm.shapes import Item

SCENE = [Item("square", "red", 0, 1, 0, 0), Item("circle", "blue", 0, 0, 0, 0), Item("triangle", "green", 1, 1, 0, 0)]


def test_a_picture_shows_each_shape_in_its_colour_at_its_cell_centre():
    image = shapes.draw(SCENE)
    cell = shapes.IMAGE_SIZE // shapes.GRID
    for item in SCENE:
        centre = (item.col * cell + cell // 2, item.row * cell + cell // 2)
        assert image.getpixel(centre) == shapes.COLOURS[item.colour], item
    assert image.getpixel((cell // 2, cell + cell // 2)) == shapes.CELL_TINTS[(1, 0)]  # an empty cell


@pytest.mark.parametrize("kind, question, answer", [
    ("colour", "what colour is the square?", "square red"),
    ("shape", "what shape is the green one?", "green triangle"),
    ("count", "how many shapes are there?", "3"),
])
def test_single_step_questions_name_what_they_look_at_then_answer(kind, question, answer):
    rng = random.Random(0)
    asked = {shapes.ask(SCENE, kind, rng) for _ in range(50)}
    assert (question, answer) in asked


def test_position_and_two_step_answers_follow_the_grid():
    rng = random.Random(0)
    asked = dict(shapes.ask(SCENE, kind, rng) for kind in ("position", "two_step") for _ in range(200))
    assert asked["is the circle left or right of the square?"] == "circle left"
    assert asked["is the triangle above or below the square?"] == "triangle below"
    assert asked["what colour is the shape left of the square?"] == "square right circle blue"
    assert asked["what colour is the shape below the square?"] == "square above triangle green"
    assert "what colour is the shape right of the circle?" not in asked  # two shapes are right of it: ambiguous


def test_splits_have_equal_kinds_and_eval_layouts_never_appear_in_training():
    train = shapes.make_records(500, seed=1, held_out=False)
    evals = shapes.make_records(100, seed=2, held_out=True)
    assert Counter(r["kind"] for _, r in train) == {kind: 100 for kind in shapes.KINDS}
    assert all(shapes.is_eval_scene(scene) for scene, _ in evals)
    assert not any(shapes.is_eval_scene(scene) for scene, _ in train)
    assert all(len(r["answer"].split()) <= shapes.MAX_ANSWER_WORDS for _, r in train + evals)


def test_toy_writes_data_models_and_a_config_with_absolute_paths(tmp_path):
    torch.manual_seed(0)
    path = toy.build_toy(tmp_path / "toy", progress=False,
                         size=toy.Size(train_records=20, eval_records=5, teacher_steps=2, student_steps=2))
    config = load_config(path)
    assert config.modality == "vlm" and config.student.trainable == "lm_only"
    for value in (config.student.path, config.teacher.path, config.data.train, config.data.eval, config.train.out_dir):
        assert Path(value).is_absolute()
    for role in ("teacher", "student"):
        assert json.loads((Path(getattr(config, role).path) / "config.json").read_text())["model_type"] == "llava"
    records = [json.loads(line) for line in Path(config.data.eval).read_text().splitlines()]
    assert len(records) == 5 and all((Path(config.data.eval).parent / r["images"][0]).is_file() for r in records)


def test_another_toy_seed_draws_other_data_and_other_models_and_the_same_seed_the_same(tmp_path):
    size = toy.Size(train_records=20, eval_records=5, teacher_steps=2, student_steps=2)
    built = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        toy.build_toy(out, progress=False, size=size, seed=seed)
        built[name] = [(out / rel).read_bytes() for rel in ("data/eval.jsonl", "teacher/model.safetensors")]
    assert built["a"] == built["b"]
    assert all(x != y for x, y in zip(built["a"], built["c"]))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "smolvlm", "gemma3"])
def test_the_toy_student_shares_the_teachers_frozen_vision_side_and_has_its_own_language_model(family):
    teacher = build_family_model(family, shapes.WORDS, toy.TEACHER, image_tokens=toy.IMAGE_TOKENS, seed=0).model
    student = build_family_model(family, shapes.WORDS, toy.STUDENT, image_tokens=toy.IMAGE_TOKENS, seed=1).model
    toy.share_vision(teacher, student)
    t_params = dict(teacher.named_parameters())
    language = {id(p) for part in (student.get_decoder(), student.get_output_embeddings()) for p in part.parameters()}
    for name, param in student.named_parameters():
        if id(param) in language:
            assert param.requires_grad, name
        else:
            assert torch.equal(param, t_params[name]) and not param.requires_grad, name
    assert sum(p.numel() for p in student.get_decoder().parameters()) < sum(
        p.numel() for p in teacher.get_decoder().parameters())
