"""`write_engine_checkpoint`, the folder a vLLM engine starts from and reloads at every sync: the LM head untied in
a file of its own beside the shards that `save_pretrained` wrote (which are rewritten only where the engine names
a key otherwise), and an index over both, so that transformers reads it back as the same model with its own head."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from mmopd.config import ConfigError
from mmopd.engines.vllm import UNTIED_HEAD_FILE, VLLMRollout, default_sync_dir, ties_head, write_engine_checkpoint
from mmopd.step.batch import TokenSpace
from tests.vllm_models import build_text


def _keys(path):
    with safe_open(path, "pt") as opened:
        return set(opened.keys())


def test_the_engine_copy_unties_the_head_into_its_own_file_and_reads_back_as_the_same_model(tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(build_text(tmp_path / "tied", "student"))
    assert ties_head(tmp_path / "tied")
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.1 * torch.randn_like(model.model.embed_tokens.weight))  # trained
    out = write_engine_checkpoint(model, tmp_path / "engine", lambda key: key)
    assert not ties_head(out) and _keys(out / UNTIED_HEAD_FILE) == {"lm_head.weight"}
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["lm_head.weight"] == UNTIED_HEAD_FILE and set(index.values()) == {UNTIED_HEAD_FILE,
                                                                                  "model-body.safetensors"}
    copy = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert copy.lm_head.weight is not copy.model.embed_tokens.weight
    assert torch.equal(copy.lm_head.weight, model.lm_head.weight)
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, model(ids).logits)


def test_keys_the_engine_names_otherwise_are_renamed_in_every_file(tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(build_text(tmp_path / "tied", "student"))
    rename = lambda key: key.replace("model.", "inner.", 1) if key.startswith("model.") else "top." + key
    out = write_engine_checkpoint(model, tmp_path / "engine", rename)
    body, head = _keys(out / "model-body.safetensors"), _keys(out / UNTIED_HEAD_FILE)
    assert head == {"top.lm_head.weight"} and all(k.startswith("inner.") for k in body)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == body | head


def test_a_directory_it_did_not_write_is_refused_and_kept_one_it_wrote_is_replaced(tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(build_text(tmp_path / "tied", "student"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"run is not empty and is no engine checkpoint that mmopd wrote .*nothing "
                                          r"was deleted"):
        write_engine_checkpoint(model, tmp_path / "run", lambda key: key)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n" and (tmp_path / "run" / "checkpoints").is_dir()
    out = write_engine_checkpoint(model, tmp_path / "engine", lambda key: key)
    (out / "stale.safetensors").write_bytes(b"an earlier export's file")
    assert write_engine_checkpoint(model, out, lambda key: key) == out and not (out / "stale.safetensors").exists()


def test_closing_the_engine_removes_its_weight_copies_and_the_folder_made_for_it(tmp_path):
    """A run's end (finished or failed) closes its rollout engine: no student copy stays in /dev/shm's RAM."""
    model = transformers.AutoModelForCausalLM.from_pretrained(build_text(tmp_path / "tied", "student"))

    def engine(sync_dir, owned):
        return VLLMRollout(None, TokenSpace(8), [], 0, 4, sync_dir, False, lambda key: key, owns_sync_dir=owned)

    made = default_sync_dir()
    write_engine_checkpoint(model, made / "start", lambda key: key)  # a colocated engine's start copy
    engine(made, owned=True).close()
    assert not made.exists()
    given = tmp_path / "sync"  # rollout.sync_dir: the user's folder keeps what it held
    (given / "weights").mkdir(parents=True)  # a sync cut short
    (given / "notes.txt").write_text("the user's")
    write_engine_checkpoint(model, given / "start", lambda key: key)
    engine(given, owned=False).close()
    assert [p.name for p in given.iterdir()] == ["notes.txt"]
