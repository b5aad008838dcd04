"""The vLLM teacher scorer: a teacher served (`teacher.url`) or colocated scores the responses by prompt log-probs,
or, served as a pooling model, sends its last hidden states for the trainer's copy of its LM head."""

from __future__ import annotations

import torch

from mmopd.engines.base import DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, TeacherNeed
from mmopd.engines.vllm.head import TeacherHead
from mmopd.engines.vllm.transport import EngineError, Entries, Scoring
from mmopd.step.batch import PromptBatch, TokenSpace
from mmopd.step.scores import Hidden, Logits, Scores, TokenLogprobs, TopKTail


class VLLMTeacher:
    """Scores with a vLLM teacher, served (`teacher.url`) or colocated (a `vllm.LLM` here): one request per row,
    `{"prompt_token_ids": the teacher's prompt ids (left padding removed, one placeholder a picture) + the
    response ids up to and including the first EOS, "multi_modal_data": {"image": [...]}}`, scored with
    `max_tokens: 1` and `prompt_logprobs`. The engine expands each picture's placeholder as the HF processor does,
    so for a prompt of P expanded ids `prompt_logprobs[P + t]` scores response token t.

    | TeacherNeed     | the engine sends                      | returns                                          |
    |-----------------|---------------------------------------|--------------------------------------------------|
    | token_logprobs  | prompt_logprobs 0                     | TokenLogprobs: log p_T of each response token     |
    | top_k           | prompt_logprobs K                     | TopKTail: the K largest log-probs, the rest a tail |
    | distribution    | its last hidden states (`/pooling`)   | Hidden with the teacher's head (`head`): exact    |

    The log-probs are the raw model's: temperature 1, over the teacher's whole vocabulary (the in-process teacher
    renormalises over the TokenSpace; the two agree where the teacher puts no mass outside it). Top-k ids outside
    the TokenSpace fall into the tail. Positions past a row's response (after EOS) get log-prob 0 (TokenLogprobs)
    or no slots (TopKTail); the loss masks them. An answer of the wrong length, or with a NaN or +inf log-prob,
    is an error naming the row.

    The full distribution comes from a server of per-token embeddings (`served.POOLING_ARGS`): the hidden state
    at position P + t − 1 of prompt + response, the final norm's output, is what the teacher's head turns into
    the logits that score response token t. With the head read from the teacher's checkpoint (`head.load_head`)
    the trainer's divergence is the in-process teacher's, at any temperature, over the TokenSpace: `Hidden`
    scores where the run fuses (`fused`), else the logits they make. Text prompts only."""

    def __init__(self, transport: Scoring, space: TokenSpace, eos_ids: list[int], head: TeacherHead | None = None,
                 fused: bool = True):
        self.transport, self.space, self.eos_ids, self.head, self.fused = transport, space, eos_ids, head, fused
        self.action_of = {token: action for action, token in enumerate(space.token_ids())}

    def score(self, prompts: PromptBatch, tokens: torch.Tensor, need: TeacherNeed) -> Scores:
        where = self.transport.url
        if need.what == DISTRIBUTION and self.head is not None:
            return self._distribution(prompts, tokens)
        if need.what not in (TOKEN_LOGPROBS, TOP_K):
            raise EngineError(f"a vLLM teacher ({where}) cannot send its full distribution; set teacher.top_k: K, "
                              "objective.estimator: sampled, or teacher.engine: hf")
        if need.temperature != 1.0:
            raise EngineError(f"a vLLM teacher's log-probs are at temperature 1, not {need.temperature}")
        expanded = prompts.unpadded_ids()  # [B] lists: the prompt as the model reads it, pictures expanded
        ids = prompts.state.get("engine_ids") or expanded  # as the engine takes it: one placeholder a picture
        images = prompts.state.get("images") or [[] for _ in ids]
        responses = [self._response(row) for row in tokens.tolist()]  # [B] lists, padding after EOS removed
        k = need.k if need.what == TOP_K else 0
        requests = [{"prompt_token_ids": p + r, **({"multi_modal_data": {"image": pics}} if pics else {})}
                    for p, r, pics in zip(ids, responses, images)]
        answers = self.transport.prompt_logprobs(requests, k)
        B, T = tokens.shape
        if need.what == TOKEN_LOGPROBS:
            values = torch.zeros(B, T)  # [B, T]
            for i, (prompt, response, answer) in enumerate(zip(expanded, responses, answers)):
                entries = self._entries(i, prompt, response, answer)
                values[i, : len(response)] = torch.tensor([self._logprob(i, t, e, token)
                                                           for t, (e, token) in enumerate(zip(entries, response))])
            return TokenLogprobs(values.to(tokens.device))
        logprobs, actions = torch.full((B, T, k), float("-inf")), torch.zeros(B, T, k, dtype=torch.long)
        for i, (prompt, response, answer) in enumerate(zip(expanded, responses, answers)):
            for t, entry in enumerate(self._entries(i, prompt, response, answer)):
                top = sorted(((self._logprob(i, t, entry, key), key) for key in entry), reverse=True)[:k]
                kept = [(lp, self.action_of[token]) for lp, token in top if token in self.action_of]
                if kept:
                    logprobs[i, t, : len(kept)] = torch.tensor([lp for lp, _ in kept])
                    actions[i, t, : len(kept)] = torch.tensor([a for _, a in kept])
        return TopKTail(logprobs.to(tokens.device), actions.to(tokens.device))

    def _distribution(self, prompts: PromptBatch, tokens: torch.Tensor) -> Hidden | Logits:
        """The teacher's last hidden states at the response positions [B, T, H] with its head, restricted to the
        TokenSpace; positions past a row's response are zeros (the loss masks them)."""
        if prompts.state.get("images"):
            raise EngineError(f"the teacher at {self.transport.url} sends hidden states for token ids only, not "
                              "pictures; set teacher.top_k: K for a VLM teacher")
        ids = prompts.unpadded_ids()  # [B] lists, left padding removed
        responses = [self._response(row) for row in tokens.tolist()]  # [B] lists, padding after EOS removed
        states = self.transport.hidden_states([p + r for p, r in zip(ids, responses)])
        head = self._head_on(tokens.device)
        B, T = tokens.shape
        H = head.weight.shape[1]
        hidden = torch.zeros(B, T, H, dtype=head.weight.dtype)  # [B, T, H]
        for i, (prompt, response, flat) in enumerate(zip(ids, responses, states)):
            if flat.numel() != (len(prompt) + len(response)) * H:
                raise EngineError(f"the teacher ({self.transport.url}) sent row {i} (prompt {prompt[:8]}…) "
                                  f"{flat.numel()} numbers for {len(prompt)} prompt + {len(response)} response ids of "
                                  f"{H} hidden units; it does not read the ids it was sent, or is another model")
            rows = flat.view(-1, H)[len(prompt) - 1: len(prompt) - 1 + len(response)]  # row t predicts token t
            if not torch.isfinite(rows).all():
                raise EngineError(f"the teacher ({self.transport.url}) sent non-finite hidden states for row "
                                  f"{i} (prompt {prompt[:8]}…): its numerics failed (check its dtype and weights)")
            hidden[i, : len(response)] = rows.to(hidden.dtype)
        scores = Hidden(hidden.to(tokens.device), head.weight, head.bias).restrict(self.space)
        if self.fused:
            return scores
        return Logits(torch.nn.functional.linear(scores.hidden, scores.weight, scores.bias))  # [B, T, A]

    def _head_on(self, device: torch.device) -> TeacherHead:
        """The teacher's head, moved to `device` once."""
        if self.head.weight.device != device:
            self.head = TeacherHead(self.head.weight.to(device),
                                    None if self.head.bias is None else self.head.bias.to(device))
        return self.head

    def _response(self, row: list[int]) -> list[int]:
        """The response ids up to and including the first EOS (all of them when none ends it)."""
        end = next((t + 1 for t, token in enumerate(row) if token in self.eos_ids), len(row))
        return row[:end]

    def _entries(self, row: int, prompt: list[int], response: list[int], answer: Entries) -> Entries:
        """The answer's entries for the response tokens, refusing an answer of the wrong length."""
        if len(answer) != len(prompt) + len(response):
            raise EngineError(f"the teacher ({self.transport.url}) scored row {row} (prompt {prompt[:8]}…) with "
                              f"{len(answer)} log-probs for {len(prompt)} prompt + {len(response)} response ids; "
                              "it does not read the ids it was sent (another tokenizer or image processor, a "
                              "truncating max-model-len?)")
        return answer[len(prompt):]

    def _logprob(self, row: int, t: int, entry: dict[int, float] | None, token: int) -> float:
        if entry is None or token not in entry:
            raise EngineError(f"the teacher ({self.transport.url}) sent no log-prob of token {token} at row {row}, "
                              f"response position {t}")
        value = entry[token]
        if value != value or value == float("inf"):
            raise EngineError(f"the teacher ({self.transport.url}) sent log-prob {value} at row {row}, response "
                              f"position {t}: its numerics failed (check its dtype and weights)")
        return value
