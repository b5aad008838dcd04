"""Rollouts: masks stop at EOS, sampling filters, and behaviour log-probs that match a full forward."""

from __future__ import annotations

import torch

from mmopd.engines.hf import filter_logits, rollout, sample
from mmopd.models.adapter import ModalityAdapter, PolicySide
from mmopd.models.hf import ModelCalls
from mmopd.run.session import Session
from mmopd.step.batch import PromptBatch, Sampling, TokenSpace

EOS, PAD = 3, 0


class ScriptedCalls(ModelCalls):
    """Emits a fixed token script per row (one-hot logits), ignoring the model."""

    def __init__(self, script: list[list[int]], vocab: int = 6):
        self.script, self.vocab, self.t = script, vocab, 0

    def _logits(self) -> torch.Tensor:
        rows = [s[min(self.t, len(s) - 1)] for s in self.script]
        return torch.nn.functional.one_hot(torch.tensor(rows), self.vocab).float() * 50

    def start(self, model, prompts):
        self.t = 0
        return self._logits(), None

    def step(self, model, tokens, state):
        self.t += 1
        return self._logits(), None


class ScriptedAdapter(ModalityAdapter):
    def __init__(self, script: list[list[int]], vocab: int = 6):
        super().__init__()
        self.calls = ScriptedCalls(script, vocab)


def _prompts(batch: int) -> PromptBatch:
    return PromptBatch(torch.ones(batch, 2, dtype=torch.long), torch.ones(batch, 2, dtype=torch.long))


def test_mask_stops_after_first_eos_and_pads_the_rest():
    adapter = ScriptedAdapter([[1, EOS, 2, 2, 2], [1, 2, 2, EOS, 1], [2, 2, 2, 2, 2]])
    out = rollout(PolicySide(adapter, None, None, TokenSpace(6), [EOS], PAD), _prompts(3), 5, Sampling(temperature=0))
    assert out.tokens.tolist() == [[1, EOS, PAD, PAD, PAD], [1, 2, 2, EOS, PAD], [2, 2, 2, 2, 2]]
    assert out.mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_rollout_stops_early_once_every_row_ended():
    adapter = ScriptedAdapter([[EOS], [1, EOS]])
    out = rollout(PolicySide(adapter, None, None, TokenSpace(6), [EOS], PAD), _prompts(2), 10, Sampling(temperature=0))
    assert out.tokens.shape == (2, 2)
    assert out.mask.tolist() == [[1, 0], [1, 1]]


def test_sampling_never_emits_tokens_outside_the_token_space():
    logits = torch.zeros(64, 10)
    logits[:, 7:] = 100.0  # padded rows beyond a 6-token vocabulary would win if not restricted
    actions, _ = sample(TokenSpace(6).restrict(logits), Sampling(), torch.Generator().manual_seed(0))
    assert actions.max().item() < 6
    space = TokenSpace(3, ids=torch.tensor([2, 5, 9]))
    tokens = space.to_tokens(sample(space.restrict(logits), Sampling(), torch.Generator().manual_seed(0))[0])
    assert set(tokens.tolist()) <= {2, 5, 9}
    assert space.to_actions(torch.tensor([9, 2, 5])).tolist() == [2, 0, 1]


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False, False]]
    # nucleus 0.8: 0.5 + 0.2 < 0.8, so the third token (reaching 0.85) is the last one kept
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.4)).tolist() == [[True, False, False, False, False]]


def test_sampling_matches_the_temperature_scaled_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(20000, 1)
    actions, logprobs = sample(logits, Sampling(temperature=2.0), torch.Generator().manual_seed(0))
    expected = (logits[0] / 2).softmax(-1)
    freq = torch.bincount(actions, minlength=3).float() / len(actions)
    assert torch.allclose(freq, expected, atol=0.015)
    assert torch.allclose(logprobs, expected.log()[actions], atol=1e-6)


def test_same_generator_seed_gives_the_same_rollout(text_config):
    session = Session(text_config(**{"objective.kind": "sft"}))
    prompts = session.adapter.encode_prompts(session.train_data.records[:4], session.student_processor)
    runs = [rollout(session.side(session.policy, session.student_processor), prompts, 8, Sampling(),
                    torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)


def test_behaviour_logprobs_equal_a_full_forward_over_prompt_and_response(text_config):
    """KV-cached sampling with left-padded prompts must see the same logits as one teacher-forced pass."""
    session = Session(text_config(**{"objective.kind": "sft"}))
    records = [{"prompt": "1+2=", "answer": None}, {"prompt": "123+456=", "answer": None}]  # unequal padding
    prompts = session.adapter.encode_prompts(records, session.student_processor)
    assert prompts.attention_mask[0, 0] == 0  # the short prompt is left-padded
    out = rollout(session.side(session.policy, session.student_processor), prompts, 8, Sampling(),
                  torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = session.space.restrict(session.adapter.calls.response_logits(session.policy, prompts, out.tokens))
    recomputed = logits.float().log_softmax(-1).gather(-1, out.tokens[..., None]).squeeze(-1)
    assert torch.allclose(recomputed * out.mask, out.logprobs * out.mask, atol=1e-4)


def test_batched_prompts_of_different_lengths_roll_out_as_each_prompt_alone(text_config):
    """Greedy decoding of a left-padded batch gives every row the tokens it gets on its own."""
    session = Session(text_config(**{"objective.kind": "sft"}))
    records = [{"prompt": p, "answer": None} for p in ("1+2=", "123+456=", "12+3=")]
    side, args = session.side(session.policy, session.student_processor), (8, Sampling(temperature=0))
    batched = rollout(side, session.adapter.encode_prompts(records, session.student_processor), *args)
    for i, record in enumerate(records):
        alone = rollout(side, session.adapter.encode_prompts([record], session.student_processor), *args)
        T = alone.tokens.shape[1]
        assert torch.equal(batched.tokens[i, :T], alone.tokens[0]) and torch.equal(batched.mask[i, :T], alone.mask[0])
        assert batched.mask[i, T:].sum() == 0
