"""The colocated transport (`rollout.url` empty): a `vllm.LLM` in the trainer's process. On a GPU it takes
`rollout.gpu_memory_utilization` of the device, and with `rollout.sleep` it sleeps (frees its weights and KV cache)
between rollouts. vLLM is imported only here, so the main venv never needs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmopd.engines.vllm.transport import Completion, EngineError, Entries

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # LoRAConfig.max_lora_rank's choices (vLLM 0.32)


class Colocated:
    """A `vllm.LLM` in this process (vLLM is imported here only: the main venv need not have it)."""

    def __init__(self, path: str, dtype: str, max_model_len: int | None, gpu_memory_utilization: float,
                 sleep: bool, lora_rank: int):
        from vllm import LLM  # optional dependency: only the colocated engine needs vLLM in this process

        kwargs: dict[str, Any] = {"enforce_eager": True, "logprobs_mode": "processed_logprobs",
                                  "gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": sleep,
                                  # token ids in and out: a checkpoint without tokenizer files still loads
                                  "skip_tokenizer_init": not (Path(path) / "tokenizer_config.json").exists()}
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if lora_rank:  # vLLM takes these maximum ranks only; a smaller adapter fits under the next one
            kwargs.update(enable_lora=True, max_lora_rank=next(r for r in VLLM_LORA_RANKS if r >= lora_rank))
        self.llm = LLM(model=path, dtype=dtype, **kwargs)
        self.sleep = sleep
        self.lora: Any = None
        self.url = "colocated vLLM"  # where error messages say the engine is

    def prompt_logprobs(self, requests: list[dict[str, Any]], k: int) -> list[Entries]:
        """Each request's log-prob of every given id (and its top k) per position, as `Served.prompt_logprobs`."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[None if e is None else {token: lp.logprob for token, lp in e.items()} for e in out.prompt_logprobs]
                for out in outputs]

    def hidden_states(self, ids: list[list[int]]) -> list[Any]:
        """Refused: this engine generates, and vLLM pools hidden states only in an engine of its own."""
        raise EngineError("a colocated vLLM teacher sends log-probs only; for its hidden states (the full "
                          "distribution) serve it as a pooling model and set teacher.url (README: A vLLM teacher)")

    def generate(self, prompts: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[Completion]:
        from vllm import SamplingParams

        if self.sleep:
            self.llm.wake_up()
        outputs = self.llm.generate(prompts, [SamplingParams(**p, detokenize=False) for p in params],
                                    lora_request=self.lora, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=1)
        completions = []
        for out in outputs:
            sample = out.outputs[0]
            logprobs = [entry[token].logprob for token, entry in zip(sample.token_ids, sample.logprobs)] \
                if sample.logprobs else [0.0] * len(sample.token_ids)
            completions.append(Completion(list(sample.token_ids), logprobs))
        return completions

    def reload_weights(self, directory: Path) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(directory)})

    def load_lora(self, name: str, version: int, directory: Path) -> None:
        from vllm.lora.request import LoRARequest

        self.lora = LoRARequest(name, version, str(directory))
