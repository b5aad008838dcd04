"""The image_tokens modality with the built-in class-conditional (LlamaGen-style) family: the codebook as
the action space, classifier-free guidance, alignment of teacher forcing with cached sampling, the VQ
tokenizer, pairing checks, record checks and picture metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ChameleonConfig

from mmopd.config import ConfigError
from mmopd.data.records import DataError
from mmopd.engines.hf import rollout
from mmopd.losses import token_divergence
from mmopd.models.adapter import ModelLoadError, PolicySide
from mmopd.models.compat import IncompatibleModelsError
from mmopd.run.objectives import Plan, Timer, objective_step
from mmopd.run.session import Session
from mmopd.step.batch import Sampling
from modalities.image_tokens import shapes, toy
from modalities.image_tokens.adapter import family_of
from modalities.image_tokens.judge import feature_stats, frechet_distance
from modalities.image_tokens.llamagen import LlamaGenTokenizer
from modalities.image_tokens.vq import VQConfig, VQModel
from tests.image_tokens.helpers import GRID_TOKENS, build_llamagen_task, llamagen_config, save_llamagen, tiny_tokenizer

K = 16  # codes in the tiny VQ


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_llamagen_task(tmp_path_factory.mktemp("llamagen"))


@pytest.fixture
def config(task, tmp_path):
    return lambda **overrides: llamagen_config(task, tmp_path / "run", **overrides)


def _records(session, n: int) -> list[dict]:
    return session.train_data.records[:n]


def _cached_logits(adapter, model, prompts, tokens: torch.Tensor) -> torch.Tensor:
    """Logits from prefill + one cached step per token, as a rollout computes them. [B, T] -> [B, T, V]"""
    logits, state = adapter.calls.start(model, prompts)
    out = [logits]
    for t in range(tokens.shape[1] - 1):
        logits, state = adapter.calls.step(model, tokens[:, t], state)
        out.append(logits)
    return torch.stack(out, 1)


def test_sampling_never_leaves_the_codebook_even_when_other_tokens_score_higher(config):
    session = Session(config())
    head = session.policy.lm_head.weight.data
    head[K:] = head[K:] * 0 + 5.0  # every special and class token now outscores the codes
    prompts = session.adapter.encode_prompts(_records(session, 4), session.student_processor)
    with torch.no_grad():
        first, _ = session.adapter.calls.start(session.policy, prompts)
    assert (first.argmax(-1) >= K).all()  # unrestricted, the policy would leave the codebook
    out = rollout(session.side(session.policy, session.student_processor), prompts, GRID_TOKENS,
                  Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    assert session.space.size == K
    assert out.tokens.shape == (4, GRID_TOKENS)
    assert out.tokens.max().item() < K and out.tokens.min().item() >= 0
    assert out.mask.sum().item() == 4 * GRID_TOKENS  # pictures never end early


def test_divergence_is_renormalised_over_the_codebook(config):
    session = Session(config())
    gen = torch.Generator().manual_seed(0)
    V = session.student_processor.vocab_size
    student, teacher = torch.randn(3, 5, V, generator=gen), torch.randn(3, 5, V, generator=gen)
    teacher[..., K:] += 30.0  # mass outside the codebook must not matter
    s, t = session.space.restrict(student), session.space.restrict(teacher)  # [3, 5, K]
    got = token_divergence(s, t, kind="reverse_kl")
    p_s, p_t = s.softmax(-1), t.softmax(-1)  # renormalised over the K codes
    expected = (p_s * (p_s.log() - p_t.log())).sum(-1)
    assert s.shape[-1] == K
    assert torch.allclose(got, expected, atol=1e-5)
    same_codes = student.clone()
    same_codes[..., K:] = teacher[..., K:]
    assert torch.allclose(token_divergence(session.space.restrict(student), session.space.restrict(same_codes)),
                          torch.zeros(3, 5), atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_guided_teacher_logits_match_bruteforce_cfg(config, scale):
    session = Session(config(**{"teacher.cfg_scale": scale}))
    teacher, tok = session.teacher, session.teacher_processor
    records = _records(session, 3)
    tokens = torch.randint(0, K, (3, GRID_TOKENS), generator=torch.Generator().manual_seed(1))
    prompts = session.adapter.encode_prompts(records, tok)
    guided = session.adapter.calls.response_logits(teacher, prompts, tokens)  # [B, T, V]
    assert guided.shape == (3, GRID_TOKENS, tok.vocab_size)
    for b, record in enumerate(records):
        cond_ids = [tok.class_offset + record["label"], tok.boi_token_id] + tokens[b].tolist()
        uncond_ids = [tok.null_class_id, tok.boi_token_id] + tokens[b].tolist()
        with torch.no_grad():
            cond = teacher(input_ids=torch.tensor([cond_ids])).logits[0, 1:-1]  # rows 1.. predict tokens 0..
            uncond = teacher(input_ids=torch.tensor([uncond_ids])).logits[0, 1:-1]
        assert torch.allclose(guided[b], uncond + scale * (cond - uncond), atol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_teacher_forced_logits_equal_kv_cached_rollout_logits(config, scale):
    session = Session(config(**{"teacher.cfg_scale": scale}))
    adapter, space = session.adapter, session.space
    for model, processor in ((session.teacher, session.teacher_processor), (session.policy, session.student_processor)):
        prompts = adapter.encode_prompts(_records(session, 3), processor)
        out = rollout(PolicySide(adapter, model, None, space, [], session.pad_id), prompts, GRID_TOKENS,
                      Sampling(temperature=1.0), torch.Generator().manual_seed(0))
        with torch.no_grad():
            forced = space.restrict(adapter.calls.response_logits(model, prompts, out.tokens))  # [B, T, K]
            cached = space.restrict(_cached_logits(adapter, model, prompts, out.tokens))
        assert torch.allclose(forced, cached, atol=1e-5)
        behaviour = forced.log_softmax(-1).gather(-1, out.tokens[..., None]).squeeze(-1)  # row t scores token t
        assert torch.allclose(out.logprobs, behaviour, atol=1e-5)


def test_vq_round_trip_shapes_and_reconstruction_improve_with_training():
    pictures = shapes.to_tensor(shapes.make_images(64, seed=5)[0])  # [64, 3, 16, 16]
    config = VQConfig(**{**toy.VQ, "channels": 16})
    torch.manual_seed(0)
    untrained = VQModel(config)
    codes = untrained.encode(pictures)
    assert codes.shape == (64, GRID_TOKENS) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < config.codebook_size
    assert untrained.decode(codes).shape == pictures.shape
    trained = toy.train_vq(shapes.to_tensor(shapes.make_images(256, seed=6)[0]), config, steps=60)
    before = ((untrained.decode(untrained.encode(pictures)) - pictures) ** 2).mean().item()
    after = ((trained.decode(trained.encode(pictures)) - pictures) ** 2).mean().item()
    assert after < 0.5 * before, (before, after)


def test_tokenizer_saves_and_loads_by_path(tmp_path):
    tokenizer = tiny_tokenizer(seed=3)
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = LlamaGenTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.class_names == shapes.CLASS_NAMES
    assert (loaded.codebook_size, loaded.grid, loaded.vocab_size) == (K, 4, K + 3 + len(shapes.CLASS_NAMES))
    assert torch.equal(loaded.codebook(), tokenizer.codebook())
    assert loaded.prompt_ids([2]).tolist() == [[K + 3 + 2, K + 1]]
    assert loaded.unconditional_ids(1).tolist() == [[K + 2, K + 1]]
    codes = torch.randint(0, K, (2, GRID_TOKENS), generator=torch.Generator().manual_seed(0))
    assert [np.asarray(p).tolist() for p in loaded.decode_images(codes)] == \
        [np.asarray(p).tolist() for p in tokenizer.decode_images(codes)]


@pytest.mark.parametrize("student_tokenizer,message", [
    (lambda: tiny_tokenizer(seed=7), "code vectors are not the same"),
    (lambda: tiny_tokenizer(codebook_size=32), "draws 4×4 codes from 32 codes, the teacher 4×4 codes from 16"),
    (lambda: tiny_tokenizer(class_names=[n.upper() + "!" for n in shapes.CLASS_NAMES]), "class lists differ"),
])
def test_a_student_whose_codebook_or_classes_differ_is_refused(task, tmp_path, student_tokenizer, message):
    student = save_llamagen(tmp_path / "other", student_tokenizer(), hidden=16, layers=1, seed=0)
    labels = tmp_path / "train.jsonl"
    labels.write_text('{"label": 0}\n')
    with pytest.raises(IncompatibleModelsError, match=message):
        Session(llamagen_config({**task, "student": student, "train": labels}, tmp_path / "run", **{"data.eval": ""}))


def test_out_of_range_label_is_refused_naming_the_line(task, tmp_path, config):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"label": 0}\n{"label": 9}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: .*'label' 9 is out of range: the student knows 6 classes"):
        Session(config(**{"data.train": str(bad)}))


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a green star"}', "names no class of the student; classes: a red circle"),
    ('{"label": 1, "prompt": "a blue square"}', "disagree"),
    ('{"label": true}', "must be an integer class index"),
    ('{"image": "missing.png", "label": 0}', "is not a file"),
    ("{}", "missing 'label'"),
    ('{"label": 0, "teacher_prompt": "a big red circle"}', "'teacher_prompt' .*not supported here: an image-token "
     "prompt is the class or caption to draw"),
])
def test_bad_records_are_refused_with_the_reason(tmp_path, config, line, message):
    bad = tmp_path / "train.jsonl"
    bad.write_text(line + "\n")
    with pytest.raises(DataError, match=message):
        Session(config(**{"data.train": str(bad)}))


def test_prompts_name_classes_case_and_spacing_ignored(tmp_path, config):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "A  Blue Triangle"}\n')
    assert Session(config(**{"data.train": str(data)})).train_data.records[0]["label"] == 5


def test_max_new_tokens_must_equal_the_picture_token_count(config):
    with pytest.raises(ConfigError, match="set rollout.max_new_tokens=16"):
        Session(config(**{"rollout.max_new_tokens": 8}))


def test_evaluation_needs_a_judge(config):
    with pytest.raises(ConfigError, match="set data.judge"):
        Session(config(**{"data.judge": ""}))


def test_evaluation_samples_from_a_fixed_seed_and_reports_accuracy_and_fid(config):
    session = Session(config(**{"teacher.cfg_scale": 2.0}))
    first = session.evaluate(session.policy, session.student_processor)
    second = session.evaluate(session.policy, session.student_processor)
    assert set(first["metrics"]) == {"classifier_accuracy", "fid"}
    assert first["metrics"] == second["metrics"]
    assert len(first["responses"]) == 6 and first["responses"][0].size == (16, 16)
    guided = session.evaluate(session.teacher, session.teacher_processor)["metrics"]
    assert 0.0 <= guided["classifier_accuracy"] <= 1.0 and guided["fid"] >= 0.0


def test_frechet_distance_matches_the_closed_form_in_any_feature_basis():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, abs=1e-9)
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]  # FID ignores the feature basis
    assert frechet_distance(rotation @ mu1, rotation @ np.diag(var1) @ rotation.T, rotation @ mu2,
                            rotation @ np.diag(var2) @ rotation.T) == pytest.approx(expected, abs=1e-9)
    features = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(*feature_stats(features), *feature_stats(features)) == pytest.approx(0.0, abs=1e-6)


def test_sft_targets_are_the_vq_codes_of_the_record_pictures(config):
    config = config(**{"objective.kind": "sft"})
    session = Session(config)
    records = _records(session, 4)
    answers = session.adapter.encode_answers(records, session.student_processor)
    pictures = shapes.to_tensor([Image.open(r["answer"]).convert("RGB") for r in records])
    assert answers == session.student_processor.encode_images(pictures).tolist()
    row = objective_step(session.models(), records, Plan.of(config), torch.Generator().manual_seed(0), Timer(),
                         lambda loss: loss.backward())
    assert row["response_tokens"] == 4 * GRID_TOKENS and np.isfinite(row["nll"])


def test_records_without_pictures_cannot_train_sft(config, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"label": 0}) + "\n")
    with pytest.raises(DataError, match="needs an 'answer'"):
        Session(config(**{"objective.kind": "sft", "data.train": str(data)}))


def test_a_chameleon_checkpoint_is_refused_saying_why(tmp_path):
    ChameleonConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2).save_pretrained(tmp_path / "chameleon")
    with pytest.raises(ModelLoadError, match="Chameleon cannot generate pictures"):
        family_of(str(tmp_path / "chameleon"))
