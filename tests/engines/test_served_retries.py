"""The served transport's faults, against a local HTTP endpoint that answers the way a vLLM server shutting down
does (its in-flight requests finished with finish_reason "abort", their log-probs cut short): an aborted answer is
retried like a dropped connection, never scored, and the last try's failure names the URL and the options."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmopd.engines import EngineError
from mmopd.engines.vllm import Served

ABORTED = 200, {"choices": [{"index": 0, "finish_reason": "abort", "prompt_logprobs": [None]}]}
DONE = 200, {"choices": [{"index": 0, "finish_reason": "length", "prompt_logprobs": [None, {"3": {"logprob": -0.5}}]}]}
ENGINE_DIED = 500, {"error": {"message": "EngineCore encountered an issue.", "code": 500}}  # vLLM's, as it shuts down
REFUSED = 400, {"error": {"message": "This model's maximum context length is 8 tokens.", "code": 400}}


@pytest.fixture
def endpoint():
    """A server answering each POST with the next of `answers` ((HTTP status, JSON) pairs; the last one repeats);
    `posts` counts them."""
    state = {"answers": [], "posts": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            code, answer = state["answers"][min(state["posts"], len(state["answers"]) - 1)]
            state["posts"] += 1
            body = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()


def test_an_aborted_answer_is_retried_and_the_next_complete_answer_returned(endpoint, monkeypatch):
    url, state = endpoint
    monkeypatch.setattr("mmopd.engines.vllm.served.time.sleep", lambda _: None)  # the backoff, not what is tested
    state["answers"] = [ABORTED, DONE]
    assert Served(url, timeout=5, retries=2, role="teacher").post("/v1/completions", {}) == DONE[1]
    assert state["posts"] == 2


def test_answers_aborted_on_every_try_stop_the_run_naming_the_url_and_the_options(endpoint, monkeypatch):
    url, state = endpoint
    monkeypatch.setattr("mmopd.engines.vllm.served.time.sleep", lambda _: None)
    state["answers"] = [ABORTED]
    with pytest.raises(EngineError, match="did not answer /v1/completions after 3 tries") as err:
        Served(url, timeout=5, retries=2, role="teacher").post("/v1/completions", {})
    assert url in str(err.value) and "teacher.retries" in str(err.value) and "aborted" in str(err.value)
    assert state["posts"] == 3


def test_a_server_fault_is_retried_and_a_refusal_is_not(endpoint, monkeypatch):
    """HTTP 5xx (vLLM's engine died, as when the server stops mid-request) is retried; HTTP 4xx is the server's
    answer to this request, named at once."""
    url, state = endpoint
    monkeypatch.setattr("mmopd.engines.vllm.served.time.sleep", lambda _: None)
    state["answers"] = [ENGINE_DIED, DONE]
    assert Served(url, timeout=5, retries=2, role="teacher").post("/v1/completions", {}) == DONE[1]
    state["answers"], state["posts"] = [ENGINE_DIED], 0
    with pytest.raises(EngineError, match="did not answer /v1/completions after 3 tries .*HTTP 500"):
        Served(url, timeout=5, retries=2, role="teacher").post("/v1/completions", {})
    state["answers"], state["posts"] = [REFUSED], 0
    with pytest.raises(EngineError, match="refused /v1/completions: HTTP 400: .*maximum context length"):
        Served(url, timeout=5, retries=2, role="teacher").post("/v1/completions", {})
    assert state["posts"] == 1
