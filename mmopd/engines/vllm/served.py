"""The served transport: a `vllm serve` (`python -m vllm.entrypoints.openai.api_server`) that the user started
with `VLLM_SERVER_DEV_MODE=1` (for `/collective_rpc`) and, for LoRA students, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`
(`rollout.url: http://host:port`, or `teacher.url`). Requests of one rollout go out concurrently; each is retried
`rollout.retries` times with backoff, then fails naming the URL. Each request has a deadline on the whole of it
(`rollout.timeout`), so a server that trickles bytes cannot hold a run; an answer that is not vLLM's JSON (a proxy's
page) is one line naming the URL and what came back. The server is reached directly, never through an HTTP proxy."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import logging
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from mmopd.engines.vllm.checkpoint import ties_head
from mmopd.engines.vllm.transport import Completion, EngineError, Entries

log = logging.getLogger("mmopd")

# how a teacher server that sends its last hidden states starts: a pooling model of per-token embeddings, pooled at
# every position (ALL), without normalisation (`use_activation`), of the model's last hidden states (after its final
# norm: what the LM head reads), e.g. `python -m vllm.entrypoints.openai.api_server --model DIR ${POOLING_ARGS}`
POOLING_CONFIG = '{"task": "token_embed", "pooling_type": "ALL", "use_activation": false}'
POOLING_ARGS = ("--runner", "pooling", "--convert", "embed", "--pooler-config", POOLING_CONFIG)


class Served:
    """A `vllm serve` at `url`: completions over HTTP, bounded retries with backoff, then a clear error."""

    def __init__(self, url: str, timeout: float, retries: int, role: str = "rollout",
                 check: Callable[[dict[str, Any]], None] | None = None):
        self.url, self.timeout, self.retries, self.role = url.rstrip("/"), timeout, retries, role
        self.model: str | None = None  # the served model's name, or the current LoRA adapter's
        self.check = check  # run on the served model's /v1/models entry before its first use
        self.received = 0  # bytes of the answers' bodies so far: what the wire carried (benchmarks.teacher)
        self._counting = threading.Lock()  # the requests of one call go out from several threads

    def post(self, route: str, payload: dict[str, Any], text: bool = False) -> Any:
        """POST `payload` as JSON; the parsed answer (`text`: a route that may answer plain text), retried
        `retries` times with backoff where another try may mend it."""
        body = json.dumps(payload).encode()
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0 ** (attempt - 1), 10.0))
            try:
                return self.once(route, body, text)
            except Transient as err:
                error = err.cause
        raise EngineError(f"{self.unreachable(route, error, f' after {self.retries + 1} tries')}. The last "
                          "checkpoint is intact: resume once the server is back") from error

    def post_get(self, route: str) -> Any:
        """GET `route`'s JSON answer, in one try."""
        try:
            return self.once(route, None)
        except Transient as err:
            raise EngineError(self.unreachable(route, err.cause)) from err.cause

    def once(self, route: str, body: bytes | None, text: bool = False) -> Any:
        """One request (a POST of `body`, or a GET): the parsed answer. Raises Transient where another try may
        mend it (no answer in time, a server fault, an aborted answer), EngineError where it will not."""
        try:
            status, kind, data = request(self.url + route, body, self.timeout)
        except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, a torn answer
            raise Transient(err) from err
        with self._counting:
            self.received += len(data)
        detail = data.decode(errors="replace")
        if status >= 500:  # a server fault (its engine died): retried
            raise Transient(ConnectionError(f"HTTP {status}: {detail[:300]}"))
        if status >= 400:  # the server refused the request: retrying will not change its mind
            raise EngineError(f"vLLM at {self.url} refused {route}: HTTP {status}: {detail[:300]}")
        try:
            answer = json.loads(detail)
        except json.JSONDecodeError:
            if text and status == 200:
                return detail
            raise EngineError(f"vLLM at {self.url} answered {route} with HTTP {status} {kind or 'without a type'}, "
                              f"not JSON: {' '.join(detail.split())[:120]!r}; set {self.role}.url to the vLLM server "
                              "itself, not a proxy or another service") from None
        if _aborted(answer):  # a server shutting down aborts what it holds: partial answers, retried
            raise Transient(ConnectionAbortedError(f"the server aborted the request to {route}"))
        return answer

    def unreachable(self, route: str, error: Exception | None, tries: str = "") -> str:
        """Why `route` got no answer, in words: a refused connection means no server listens there."""
        said = f"vLLM at {self.url} did not answer {route}{tries}"
        if isinstance(error, ConnectionRefusedError):
            host = urllib.parse.urlsplit(self.url).hostname or ""
            local = host in ("localhost", "0.0.0.0", "::1", socket.gethostname()) or host.startswith("127.")
            return (f"{said}: connection refused, so no server listens there ({self.role}.url): it has not started, "
                    "or its process exited" + ("; check the server's log for why" if local else ""))
        return (f"{said} ({error}); check that the server is up ({self.role}.url), or raise {self.role}.timeout and "
                f"{self.role}.retries")

    def field(self, answer: Any, route: str, *path: str | int) -> Any:
        """`answer[path[0]][path[1]]...`, where vLLM's answer to `route` holds it; else one line naming what came
        back (a service other than vLLM answered)."""
        value = answer
        try:
            for key in path:
                value = value[key]
        except (KeyError, IndexError, TypeError):
            raise EngineError(f"vLLM at {self.url} answered {route} without {'/'.join(map(str, path))}: "
                              f"{json.dumps(answer)[:120]}; set {self.role}.url to the vLLM server itself") from None
        return value

    def check_untied(self) -> None:
        """Refuse a served model whose LM head is tied to its embeddings, where its config can be read: vLLM's
        reload never refreshes a tied head, so every sync would leave the engine a step behind in its head."""
        root = Path(self.served_entry().get("root") or "") / "config.json"
        if not root.is_file():
            log.warning("cannot read the served model's config (%s) to check that its LM head is untied", root)
            return
        if ties_head(root.parent):
            raise EngineError(f"the model served at {self.url} ({root.parent}) ties its LM head to its embeddings, "
                              "which vLLM's weight reload never refreshes; serve an untied copy written by "
                              "`mmopd vllm-checkpoint CONFIG DIR`")

    def served_entry(self) -> dict[str, Any]:
        """The served model's `/v1/models` entry: its `id` (the served name) and `root` (the path it loaded)."""
        entry = self.field(self.post_get("/v1/models"), "/v1/models", "data", 0)
        if not isinstance(entry, dict):
            raise EngineError(f"vLLM at {self.url} answered /v1/models with {json.dumps(entry)[:120]} for a model; "
                              f"set {self.role}.url to the vLLM server itself")
        return entry

    def served_model(self) -> str:
        if self.model is None:
            entry = self.served_entry()
            if self.check is not None:
                self.check(entry)
            self.model = self.field(entry, "/v1/models", "id")
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
            choice = self.field(answer, "/v1/completions", "choices", 0)
            self.field(answer, "/v1/completions", "choices", 0, "token_ids")
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
                return [_entries_of(answer.get("prompt_logprobs") if isinstance(answer, dict) else
                                    self.field(answer, "/inference/v1/generate", "prompt_logprobs"))]
            answer = self.post("/v1/completions", {"model": model, "max_tokens": 1, "temperature": 0.0,
                                                   "prompt": [requests[i]["prompt_token_ids"] for i in rows],
                                                   "prompt_logprobs": k})
            choices = sorted(self.field(answer, "/v1/completions", "choices"), key=lambda c: c["index"])
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

    def hidden_states(self, ids: list[list[int]], rows_per_request: int = 8) -> list[Tensor]:
        """Each id list's last hidden states, flat float32 [len(ids[i]) * H], from a pooling server (POOLING_ARGS:
        per-token embeddings of the final norm's output, no normalisation) over `POST /pooling`, `rows_per_request`
        lists a request, the requests concurrent. They come as base64 of little-endian float32: exact, 4 bytes a
        number (JSON floats are exact too, at about 20)."""
        model = self.served_model()
        jobs = [ids[i: i + rows_per_request] for i in range(0, len(ids), rows_per_request)]

        def one(rows: list[list[int]]) -> list[Tensor]:
            try:
                answer = self.post("/pooling", {"model": model, "input": rows, "task": "token_embed",
                                                "use_activation": False, "encoding_format": "base64",
                                                "embed_dtype": "float32", "endianness": "little"})
            except EngineError as err:  # no /pooling (a generating server), or a pooling server of another task
                if "HTTP 404" not in str(err) and "pooling_task" not in str(err):
                    raise
                raise EngineError(f"{err}; a teacher that sends its hidden states (the full distribution) is served "
                                  f"as a pooling model: start it with {' '.join(POOLING_ARGS[:-1])} "
                                  f"'{POOLING_CONFIG}'") from err
            items = sorted(self.field(answer, "/pooling", "data"), key=lambda item: item["index"])
            if len(items) != len(rows):
                raise EngineError(f"the teacher at {self.url} answered {len(rows)} sequences with {len(items)} "
                                  "hidden-state lists")
            return [torch.from_numpy(np.frombuffer(base64.b64decode(item["data"]), dtype="<f4").copy())
                    for item in items]

        with ThreadPoolExecutor(max_workers=min(16, max(1, len(jobs)))) as pool:
            return [states for batch in pool.map(one, jobs) for states in batch]

    def reload_weights(self, directory: Path) -> None:
        self.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(directory)}})

    def load_lora(self, name: str, version: int, directory: Path) -> None:
        self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(directory)}, text=True)
        if self.model is not None and self.model.startswith("student-v"):
            self.post("/v1/unload_lora_adapter", {"lora_name": self.model}, text=True)
        self.model = name


class Transient(Exception):
    """A request that another try may mend; `cause` says what went wrong."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


def request(url: str, body: bytes | None, timeout: float) -> tuple[int, str, bytes]:
    """One HTTP request (POST `body` as JSON, or GET) with a deadline on the whole of it: a watchdog shuts the socket
    when `timeout` seconds have passed, so a server that trickles bytes cannot hold it past then (a socket's own
    timeout bounds each read only). Returns the status, the content type and the body."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname or "", parts.port, timeout=timeout)
    expired, opened = threading.Event(), []  # the socket, kept: http.client lets go of one whose answer closes it

    def expire() -> None:
        expired.set()
        for sock in opened:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.connect()
        opened.append(connection.sock)
        if expired.is_set():
            expire()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("GET" if body is None else "POST", path, body,
                           {} if body is None else {"Content-Type": "application/json"})
        answer = connection.getresponse()
        status, content_type, data = answer.status, answer.getheader("Content-Type", ""), answer.read()
    except (OSError, http.client.HTTPException) as err:
        if expired.is_set():
            raise TimeoutError(f"no whole answer within {timeout:g} s") from err
        raise
    finally:
        watchdog.cancel()
        connection.close()
    if expired.is_set():
        raise TimeoutError(f"no whole answer within {timeout:g} s")
    return status, content_type, data


def _aborted(answer: Any) -> bool:
    """Whether vLLM finished any of the answer's choices by aborting it (it does so to every request it holds when
    it shuts down), leaving its tokens and log-probs cut short."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    return any(isinstance(c, dict) and c.get("finish_reason") == "abort" for c in choices or ())


def _entries_of(prompt_logprobs: list[Any] | None) -> Entries:
    """A JSON answer's `prompt_logprobs` ({"5": {"logprob": ...}} per position) as Entries."""
    return [None if e is None else {int(key): float(v["logprob"]) for key, v in e.items()}
            for e in prompt_logprobs or []]


def data_uri(image: Any) -> str:
    """A PIL picture as a PNG data URI (lossless: the server decodes the same pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
