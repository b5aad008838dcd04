"""The vLLM rollout engine: the student samples through a transport (`served` or `colocated`) and gets the trainer's
weights after every optimizer step.

Prompts go as token ids (the student's own encoding, left padding removed), never as re-tokenised text. The
sampled tokens are restricted to the adapter's TokenSpace (`allowed_token_ids`), so padded embedding rows and
non-codebook tokens are never drawn, and the behaviour log-prob of each token is the engine's
`processed_logprobs`: under the distribution it sampled from (temperature, top-k, top-p, allowed ids).

Weight sync (`sync`, after each optimizer step): a full student is written with `save_pretrained` (safetensors)
into `rollout.sync_dir` (default: a fresh folder on /dev/shm where it exists), reloaded in place with vLLM's
`reload_weights`, and deleted (the engine holds it then; on /dev/shm the copy is RAM). `close`, at the end of a
run that finished or failed, removes what the engine wrote there (the colocated engine's start copy, a sync cut
short, the last LoRA version) and the default folder itself; a resumed run writes its own. A LoRA student's adapters
are written as a new version and loaded as a new `LoRARequest` (served: `/v1/load_lora_adapter`). On GPUs vLLM
also offers an NCCL weight-transfer engine (`/init_weight_transfer_engine`, `/update_weights`, ...); it needs CUDA
and is not used here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mmopd.engines.vllm.checkpoint import write_engine_checkpoint
from mmopd.engines.vllm.transport import Completion, EngineError, Transport
from mmopd.models.sharding import full_state_dict, is_sharded
from mmopd.step.batch import PromptBatch, Rollout, Sampling, TokenSpace


def default_sync_dir() -> Path:
    """A fresh folder for the weights the engine reloads, named after this process: on tmpfs (/dev/shm) where the
    machine has it. The engine removes it at the end of the run (`VLLMRollout.close`)."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix=f"mmopd-sync-{os.getpid()}-",
                                 dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))


class VLLMRollout:
    """The rollout engine over a vLLM transport. `exact` is False: its log-probs come from another program's
    numerics, so the step measures the mismatch against the trainer's own."""

    exact = False

    def __init__(self, transport: Transport, space: TokenSpace, eos_ids: list[int], pad_id: int,
                 max_new_tokens: int, sync_dir: Path, lora: bool, engine_key: Callable[[str], str],
                 writer: bool = True, owns_sync_dir: bool = False):
        self.transport, self.space, self.eos_ids, self.pad_id = transport, space, eos_ids, pad_id
        self.max_new_tokens, self.sync_dir, self.lora, self.writer = max_new_tokens, sync_dir, lora, writer
        self.owns_sync_dir = owns_sync_dir  # made for this engine (default_sync_dir): removed whole at close
        self.engine_key = engine_key
        self.allowed = space.token_ids()
        self.version = 0

    def sample(self, prompts: PromptBatch, sampling: Sampling, generator: torch.Generator | None) -> Rollout:
        ids = prompts.state.get("engine_ids") or prompts.unpadded_ids()  # placeholders unexpanded, where they are
        images = prompts.state.get("images")
        requests = [{"prompt_token_ids": row} if not images or not images[i] else
                    {"prompt_token_ids": row, "multi_modal_data": {"image": images[i]}} for i, row in enumerate(ids)]
        seeds = torch.randint(0, 2**31 - 1, (len(ids),), generator=generator, device=generator.device).tolist() \
            if generator is not None else [None] * len(ids)
        params = [{"n": 1, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                   "max_tokens": self.max_new_tokens, "stop_token_ids": self.eos_ids, "logprobs": 0,
                   "allowed_token_ids": self.allowed, "seed": seed, "skip_special_tokens": False,
                   "ignore_eos": not self.eos_ids} for seed in seeds]  # no EOS (pictures): always max_new_tokens
        completions = self.transport.generate(requests, params)
        return self._rollout(completions, prompts.input_ids.device, greedy=sampling.temperature == 0)

    def _rollout(self, completions: list[Completion], device: torch.device, greedy: bool) -> Rollout:
        """Right-padded tokens [B, T], the mask up to and including the first EOS, behaviour log-probs."""
        T = max(1, max(len(c.token_ids) for c in completions))
        tokens = torch.full((len(completions), T), self.pad_id, dtype=torch.long)
        mask, logprobs = torch.zeros(len(completions), T), torch.zeros(len(completions), T)
        for i, c in enumerate(completions):
            n = len(c.token_ids)
            if n > self.max_new_tokens or len(c.logprobs) != n:
                raise EngineError(f"vLLM answered row {i} with {n} tokens and {len(c.logprobs)} log-probs "
                                  f"(max_new_tokens={self.max_new_tokens}); engine and trainer disagree")
            tokens[i, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            mask[i, :n] = 1.0
            if not greedy:
                logprobs[i, :n] = torch.tensor(c.logprobs)
        return Rollout(tokens.to(device), mask.to(device), logprobs.to(device))

    def sync(self, student: nn.Module) -> None:
        """Write the student's weights (or a new LoRA version) and have the engine load them in place. A sharded
        student's weights are gathered first, on every rank (collective); the writer writes them."""
        weights = full_state_dict(student) if is_sharded(student) else None
        if not self.writer:
            return
        self.version += 1
        if self.lora:
            target = self.sync_dir / f"lora-v{self.version}"
            getattr(student, "module", student).save_pretrained(target)  # the peft adapters only
            self.transport.load_lora(f"student-v{self.version}", self.version, target)
            previous = self.sync_dir / f"lora-v{self.version - 1}"
            if previous.exists():
                shutil.rmtree(previous)
        else:  # the engine holds the weights once reload_weights returns: the copy goes (a 7B one is ~15 GB)
            written = write_engine_checkpoint(student, self.sync_dir / "weights", self.engine_key, weights=weights)
            self.transport.reload_weights(written)
            shutil.rmtree(written)

    def close(self) -> None:
        remove_sync_dir(self.sync_dir, self.owns_sync_dir, self.version)


def remove_sync_dir(sync_dir: Path, owned: bool, version: int = 0) -> None:
    """Remove what an engine wrote into `sync_dir` (its start copy, the weights of a sync, its LoRA versions up to
    `version`), and the folder itself when it was made for the engine (`owned`)."""
    written = [sync_dir] if owned else [sync_dir / name for name in ("start", "weights")] + \
        [sync_dir / f"lora-v{v}" for v in range(1, version + 1)]
    for path in written:
        shutil.rmtree(path, ignore_errors=True)
