"""Image-token records from parquet and save_to_disk sets, target pictures as `datasets` Image features (bytes):
the same first-step sft loss as the JSONL with picture paths, and a run trains from them."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

import mmopd
from mmopd.data.step_order import step_indices
from mmopd.run.objectives import Plan, Timer, objective_step
from mmopd.run.session import Session
from tests.image_tokens.helpers import build_llamagen_task, llamagen_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_llamagen_task(tmp_path_factory.mktemp("llamagen"))


@pytest.mark.parametrize("form", ["parquet", "save_to_disk"])
def test_image_features_give_the_jsonls_first_step_sft_loss(form, task, tmp_path):
    jsonl = task["train"]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows = [{"class_id": r["label"], "picture": {"bytes": (jsonl.parent / r["image"]).read_bytes(), "path": None}}
            for r in rows]
    table = datasets.Dataset.from_list(rows).cast_column("picture", datasets.Image())
    source = tmp_path / ("train.parquet" if form == "parquet" else "disk")
    table.to_parquet(str(source)) if form == "parquet" else table.save_to_disk(str(source))
    losses = []
    for overrides in ({}, {"data.train": str(source), "data.eval": "", "data.fields": {"label": "class_id", "image": "picture"}}):
        config = llamagen_config(task, tmp_path / "run", **{"objective.kind": "sft", **overrides})
        session = Session(config)
        batch = [session.train_data.records[i] for i in step_indices(len(session.train_data), 0, 4, 0)]
        row = objective_step(session.models(), batch, Plan.of(config), torch.Generator().manual_seed(0), Timer(),
                             lambda loss: None)
        losses.append(row["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert mmopd.train(config)["steps"] == 2
