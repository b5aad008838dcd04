"""vLLM engines: the student samples with a real inference engine, colocated or served, and gets the trainer's
weights after every optimizer step; a vLLM teacher, colocated or served, scores the responses (`VLLMTeacher`, at
the end).

Placements (one transport each, the same engine on top):
- **colocated** (`rollout.url` empty): a `vllm.LLM` in the trainer's process. On a GPU it takes
  `rollout.gpu_memory_utilization` of the device, and with `rollout.sleep` it sleeps (frees its weights and
  KV cache) between rollouts. vLLM is imported only here, so the main venv never needs it.
- **served** (`rollout.url: http://host:port`): a `vllm serve` (`python -m vllm.entrypoints.openai.api_server`)
  that the user started with `VLLM_SERVER_DEV_MODE=1` (for `/collective_rpc`) and, for LoRA students,
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`. Requests of one rollout go out concurrently; each is retried
  `rollout.retries` times with backoff, then fails naming the URL.

Prompts go as token ids (the student's own encoding, left padding removed), never as re-tokenised text. The
sampled tokens are restricted to the adapter's TokenSpace (`allowed_token_ids`), so padded embedding rows and
non-codebook tokens are never drawn, and the behaviour log-prob of each token is the engine's
`processed_logprobs`: under the distribution it sampled from (temperature, top-k, top-p, allowed ids).

Weight sync (`sync`, after each optimizer step): a full student is written with `save_pretrained` (safetensors)
into `rollout.sync_dir` (default: a folder on /dev/shm where it exists), reloaded in place with vLLM's
`reload_weights`, and deleted (the engine holds it then; on /dev/shm the copy is RAM); a LoRA student's adapters are written as a new version and loaded as a new `LoRARequest`
(served: `/v1/load_lora_adapter`). On GPUs vLLM also offers an NCCL weight-transfer engine
(`/init_weight_transfer_engine`, `/update_weights`, ...); it needs CUDA and is not used here.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mmopd.batch import PromptBatch, Rollout, Sampling, TokenSpace
from mmopd.engines.base import TOKEN_LOGPROBS, TOP_K, TeacherNeed
from mmopd.hf import base_model
from mmopd.scores import Scores, TokenLogprobs, TopKTail
from mmopd.sharding import full_state_dict, is_sharded, same_parameter, write_full_model

log = logging.getLogger("mmopd")


class EngineError(RuntimeError):
    """An inference engine that cannot be reached or answers wrongly, with what to check."""


@dataclass
class Completion:
    """One sampled response: its token ids (EOS included when it stopped there) and their log-probs."""

    token_ids: list[int]
    logprobs: list[float]


class Transport(Protocol):
    def generate(self, prompts: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[Completion]:
        """Sample one completion per prompt; `params` are vLLM SamplingParams fields per prompt."""
        ...

    def reload_weights(self, directory: Path) -> None: ...

    def load_lora(self, name: str, version: int, directory: Path) -> None: ...


class Served:
    """A `vllm serve` at `url`: completions over HTTP, bounded retries with backoff, then a clear error."""

    def __init__(self, url: str, timeout: float, retries: int, role: str = "rollout"):
        self.url, self.timeout, self.retries, self.role = url.rstrip("/"), timeout, retries, role
        self.model: str | None = None  # the served model's name, or the current LoRA adapter's

    def post(self, route: str, payload: dict[str, Any]) -> Any:
        body = json.dumps(payload).encode()
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0 ** (attempt - 1), 10.0))
            request = urllib.request.Request(self.url + route, body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    text = answer.read().decode()
                parsed = json.loads(text) if text.strip().startswith(("{", "[")) else text
                if _aborted(parsed):  # a server shutting down aborts what it holds: partial answers, retried
                    raise ConnectionAbortedError(f"the server aborted the request to {route}")
                return parsed
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:300]
                if err.code < 500:  # the server refused the request: retrying will not change its mind
                    raise EngineError(f"vLLM at {self.url} refused {route}: HTTP {err.code}: {detail}") from err
                error = ConnectionError(f"HTTP {err.code}: {detail}")  # a server fault (its engine died): retried
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                error = err
        raise EngineError(f"vLLM at {self.url} did not answer {route} after {self.retries + 1} tries "
                          f"({error}); check that the server is up ({self.role}.url), or raise {self.role}.timeout "
                          f"and {self.role}.retries. The last checkpoint is intact: resume once the server is "
                          "back") from error

    def check_untied(self) -> None:
        """Refuse a served model whose LM head is tied to its embeddings, where its config can be read: vLLM's
        reload never refreshes a tied head, so every sync would leave the engine a step behind in its head."""
        answer = self.post_get("/v1/models")
        root = Path(answer["data"][0].get("root") or "") / "config.json"
        if not root.is_file():
            log.warning("cannot read the served model's config (%s) to check that its LM head is untied", root)
            return
        if ties_head(root.parent):
            raise EngineError(f"the model served at {self.url} ({root.parent}) ties its LM head to its embeddings, "
                              "which vLLM's weight reload never refreshes; serve an untied copy written by "
                              "`mmopd vllm-checkpoint CONFIG DIR`")

    def post_get(self, route: str) -> Any:
        try:
            with urllib.request.urlopen(self.url + route, timeout=self.timeout) as answer:
                return json.loads(answer.read())
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            raise EngineError(f"vLLM at {self.url} did not answer {route} ({err}); check that the server is up "
                              f"({self.role}.url)") from err

    def served_model(self) -> str:
        if self.model is None:
            self.model = self.post_get("/v1/models")["data"][0]["id"]
        return self.model

    def generate(self, prompts: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[Completion]:
        for prompt in prompts:
            if prompt.get("multi_modal_data"):
                raise EngineError("a served vLLM takes token-id prompts without pictures over /v1/completions; "
                                  "for a VLM student use the colocated engine (leave rollout.url empty)")
        model = self.served_model()

        def one(prompt: dict[str, Any], p: dict[str, Any]) -> Completion:
            answer = self.post("/v1/completions", {"model": model, "prompt": prompt["prompt_token_ids"],
                                                   "return_token_ids": True, **p})
            choice = answer["choices"][0]
            logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or [0.0] * len(choice["token_ids"])
            return Completion(choice["token_ids"], [float(v) for v in logprobs])

        with ThreadPoolExecutor(max_workers=min(32, len(prompts))) as pool:
            return list(pool.map(one, prompts, params))

    def prompt_logprobs(self, requests: list[dict[str, Any]], k: int, rows_per_request: int = 8) -> list[Entries]:
        """Each request's log-prob of every given id (and its top k) per position. Token-id rows go
        `rows_per_request` a `POST /v1/completions`; rows with pictures one a `POST /inference/v1/generate` (token
        ids plus `content_parts`: the only route of vLLM 0.32 that takes both, served with --enable-scale-out).
        The requests go out concurrently."""
        model = self.served_model()
        texts = [i for i, r in enumerate(requests) if not r.get("multi_modal_data")]
        pictures = [i for i, r in enumerate(requests) if r.get("multi_modal_data")]
        jobs = [("text", texts[i: i + rows_per_request]) for i in range(0, len(texts), rows_per_request)]
        jobs += [("pictures", [i]) for i in pictures]

        def one(job: tuple[str, list[int]]) -> list[Entries]:
            kind, rows = job
            if kind == "pictures":
                request = requests[rows[0]]
                answer = self.post("/inference/v1/generate", {
                    "model": model, "token_ids": request["prompt_token_ids"],
                    "content_parts": [{"type": "image_url", "url": data_uri(image)}
                                      for image in request["multi_modal_data"]["image"]],
                    "sampling_params": {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}})
                return [_entries_of(answer.get("prompt_logprobs"))]
            answer = self.post("/v1/completions", {"model": model, "max_tokens": 1, "temperature": 0.0,
                                                   "prompt": [requests[i]["prompt_token_ids"] for i in rows],
                                                   "prompt_logprobs": k})
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            if len(choices) != len(rows):
                raise EngineError(f"the teacher at {self.url} answered {len(rows)} sequences with {len(choices)} "
                                  "choices")
            return [_entries_of(c.get("prompt_logprobs")) for c in choices]

        answers: list[Entries] = [[] for _ in requests]
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(jobs)))) as pool:
            for (_, rows), entries in zip(jobs, pool.map(one, jobs)):
                for i, row in zip(rows, entries):
                    answers[i] = row
        return answers

    def reload_weights(self, directory: Path) -> None:
        self.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(directory)}})

    def load_lora(self, name: str, version: int, directory: Path) -> None:
        self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(directory)})
        if self.model is not None and self.model.startswith("student-v"):
            self.post("/v1/unload_lora_adapter", {"lora_name": self.model})
        self.model = name


def _aborted(answer: Any) -> bool:
    """Whether vLLM finished any of the answer's choices by aborting it (it does so to every request it holds when
    it shuts down), leaving its tokens and log-probs cut short."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    return any(isinstance(c, dict) and c.get("finish_reason") == "abort" for c in choices or ())


Entries = list[dict[int, float] | None]  # per position: token id -> log-prob (None where nothing is scored)


def _entries_of(prompt_logprobs: list[Any] | None) -> Entries:
    """A JSON answer's `prompt_logprobs` ({"5": {"logprob": ...}} per position) as Entries."""
    return [None if e is None else {int(key): float(v["logprob"]) for key, v in e.items()}
            for e in prompt_logprobs or []]


def data_uri(image: Any) -> str:
    """A PIL picture as a PNG data URI (lossless: the server decodes the same pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


UNTIED_HEAD_FILE = "lm-head-untied.safetensors"  # the untied LM head in an engine checkpoint
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


def write_engine_checkpoint(model: nn.Module, directory: Path, engine_key: Callable[[str], str],
                            processor: Any = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """`model` as vLLM loads it, in `directory`: `save_pretrained` (safetensors), with the LM head untied (vLLM's
    `reload_weights` never refreshes a tied head, so a tied engine would keep sampling from the start's head)
    and every key in the layout vLLM's loader reads (`engine_key`, the adapter's). The untied head goes in a file
    of its own (UNTIED_HEAD_FILE) beside save_pretrained's, which are read back and rewritten only where the engine
    names a key otherwise, and an index lists both. A sharded model's full `weights` come gathered
    (`sharding.full_state_dict`)."""
    base = base_model(model)
    if directory.exists():
        shutil.rmtree(directory)
    if weights is None:
        base.save_pretrained(directory, safe_serialization=True)
    else:
        write_full_model(base, directory, weights)
    if processor is not None:
        processor.save_pretrained(directory)
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    tied = head is not None and embed is not None and same_parameter(head.weight, embed.weight)
    head_key = next(name for name, module in base.named_modules() if module is head) + ".weight" if tied else None
    index_path = directory / "model.safetensors.index.json"
    weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"] if index_path.exists() else {}
    if (directory / "model.safetensors").exists():  # a single file: transformers would read it and not the index
        (directory / "model.safetensors").rename(directory / "model-body.safetensors")
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as opened:
            keys = list(opened.keys())
        weight_map.update({key: file.name for key in keys})
        if any(engine_key(k) != k for k in keys):  # only shards that vLLM names otherwise are read and rewritten
            save_file({engine_key(k): v for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    if head_key is not None:  # the head in a file of its own, beside the shards that save_pretrained wrote
        head_weight = head.weight.detach() if weights is None else weights[head_key]
        save_file({engine_key(head_key): head_weight.cpu().contiguous()}, directory / UNTIED_HEAD_FILE,
                  metadata={"format": "pt"})
        weight_map[head_key] = UNTIED_HEAD_FILE
    # an index over every file, so that transformers reads the head's file too, as vLLM does
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": {engine_key(k): v for k, v in
                                                                     sorted(weight_map.items())}}, indent=2))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    for section in (config, config.get("text_config") or {}):
        if "tie_word_embeddings" in section or section is config:
            section["tie_word_embeddings"] = False
    config_path.write_text(json.dumps(config, indent=2))
    return directory


def ties_head(directory: Path) -> bool:
    """Whether the checkpoint in `directory` ties its LM head to its input embeddings (its config says so)."""
    config = json.loads((directory / "config.json").read_text())
    return bool(config.get("tie_word_embeddings") or (config.get("text_config") or {}).get("tie_word_embeddings"))


def default_sync_dir() -> Path:
    """A fresh folder for the weights the engine reloads: on tmpfs (/dev/shm) where the machine has it."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="mmopd-sync-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))


class VLLMRollout:
    """The rollout engine over a vLLM transport. `exact` is False: its log-probs come from another program's
    numerics, so the step measures the mismatch against the trainer's own."""

    exact = False

    def __init__(self, transport: Transport, space: TokenSpace, eos_ids: list[int], pad_id: int,
                 max_new_tokens: int, sync_dir: Path, lora: bool, engine_key: Callable[[str], str],
                 writer: bool = True):
        self.transport, self.space, self.eos_ids, self.pad_id = transport, space, eos_ids, pad_id
        self.max_new_tokens, self.sync_dir, self.lora, self.writer = max_new_tokens, sync_dir, lora, writer
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


class Scoring(Protocol):
    url: str  # where the engine is, for error messages

    def prompt_logprobs(self, requests: list[dict[str, Any]], k: int) -> list[Entries]:
        """Each request's log-prob of every given id (and its top k) per position; entry 0 is None."""
        ...


class VLLMTeacher:
    """Scores with a vLLM teacher, served (`teacher.url`) or colocated (a `vllm.LLM` here): one request per row,
    `{"prompt_token_ids": the teacher's prompt ids (left padding removed, one placeholder a picture) + the
    response ids up to and including the first EOS, "multi_modal_data": {"image": [...]}}`, scored with
    `max_tokens: 1` and `prompt_logprobs`. The engine expands each picture's placeholder as the HF processor does,
    so for a prompt of P expanded ids `prompt_logprobs[P + t]` scores response token t.

    | TeacherNeed     | prompt_logprobs | returns                                                          |
    |-----------------|-----------------|------------------------------------------------------------------|
    | token_logprobs  | 0               | TokenLogprobs: log p_T of each response token (exact)             |
    | top_k           | K               | TopKTail: the K largest log-probs, the rest one tail class        |
    | distribution    | —               | refused: a server sends at most --max-logprobs entries a position |

    The log-probs are the raw model's: temperature 1, over the teacher's whole vocabulary (the in-process teacher
    renormalises over the TokenSpace; the two agree where the teacher puts no mass outside it). Top-k ids outside
    the TokenSpace fall into the tail. Positions past a row's response (after EOS) get log-prob 0 (TokenLogprobs)
    or no slots (TopKTail); the loss masks them. An answer of the wrong length, or with a NaN or +inf log-prob,
    is an error naming the row."""

    def __init__(self, transport: Scoring, space: TokenSpace, eos_ids: list[int]):
        self.transport, self.space, self.eos_ids = transport, space, eos_ids
        self.action_of = {token: action for action, token in enumerate(space.token_ids())}

    def score(self, prompts: PromptBatch, tokens: torch.Tensor, need: TeacherNeed) -> Scores:
        where = self.transport.url
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
