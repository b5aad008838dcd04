"""The served transport's faults, against a local HTTP endpoint that answers the way a vLLM server shutting down
does (its in-flight requests finished with finish_reason "abort", their log-probs cut short): an aborted answer is
retried like a dropped connection, never scored, and the last try's failure names the URL and the options."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from mmopd.cli import main
from mmopd.config import ConfigError
from mmopd.engines import EngineError
from mmopd.engines.vllm import Served
from mmopd.engines.vllm.identity import check_served_model

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


def test_the_transport_counts_the_bytes_of_every_answer_that_came_over_the_wire(endpoint, monkeypatch):
    """`Served.received`: the answers' bodies, retried ones included (benchmarks.teacher's bytes per token)."""
    url, state = endpoint
    monkeypatch.setattr("mmopd.engines.vllm.served.time.sleep", lambda _: None)
    state["answers"] = [ABORTED, DONE]
    served = Served(url, timeout=5, retries=2, role="teacher")
    served.post("/v1/completions", {})
    assert served.received == len(json.dumps(ABORTED[1]).encode()) + len(json.dumps(DONE[1]).encode())


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


# hostile peers: what a proxy, another service or a stalled server sends where vLLM's JSON should be

@pytest.fixture
def peer():
    """A server answering every GET and POST with `state["reply"](handler)`, which writes the whole answer."""
    state = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state["reply"](self)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            state["reply"](self)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()


def _page(handler, body: bytes = b"<html><body><h1>Sign in to continue</h1></body></html>",
          kind: str = "text/html") -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _trickle(handler) -> None:
    """A complete, valid answer, one byte every 0.1 s (20 s in all): each read is quick, the whole is not."""
    body = json.dumps(DONE[1]).encode().ljust(200)
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    for byte in body:
        try:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
        except OSError:  # the client hung up at its deadline: stop quietly (a traceback would reach later tests)
            return
        time.sleep(0.1)


def test_a_page_that_is_not_json_is_one_line_naming_the_url_and_what_came_back(peer):
    url, state = peer
    state["reply"] = _page
    with pytest.raises(EngineError) as err:
        Served(url, timeout=5, retries=0).generate([{"prompt_token_ids": [1, 2]}], [{}])
    message = str(err.value)
    assert f"vLLM at {url} answered /v1/models with HTTP 200 text/html, not JSON: '<html><body><h1>Sign in" in message
    assert "set rollout.url to the vLLM server itself" in message and "\n" not in message


def test_json_without_vllms_fields_is_one_line_naming_what_came_back(peer):
    url, state = peer
    state["reply"] = lambda h: _page(h, b'{"status": "ok"}', "application/json")
    with pytest.raises(EngineError, match=r'answered /v1/models without data/0: \{"status": "ok"\}'):
        Served(url, timeout=5, retries=0, role="teacher").served_model()


def test_a_server_that_trickles_bytes_is_cut_off_at_the_requests_deadline(peer):
    url, state = peer
    state["reply"] = _trickle
    with pytest.raises(EngineError, match=r"did not answer /v1/completions after 1 tries \(no whole answer within "
                                          r"0\.5 s\)"):
        Served(url, timeout=0.5, retries=0).post("/v1/completions", {})


def test_a_refused_connection_says_no_server_listens_and_points_to_its_log():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    with pytest.raises(EngineError) as err:
        Served(f"http://127.0.0.1:{port}", timeout=5, retries=0, role="teacher").post("/v1/completions", {})
    assert "connection refused, so no server listens there (teacher.url): it has not started, or its process " \
           "exited; check the server's log for why" in str(err.value)


def _train(tiny_text, tmp_path, capsys, teacher=None, rollout=None) -> tuple[int, str]:
    """`mmopd train` of a 1-step text run with these teacher and rollout settings: its exit code and its one
    message line (no traceback, no other `mmopd:` line)."""
    config = {"modality": "text", "student": {"path": str(tiny_text["student"])},
              "teacher": {"path": str(tiny_text["teacher"]), **(teacher or {})},
              "data": {"train": str(tiny_text["train"])}, "rollout": {"max_new_tokens": 4, **(rollout or {})},
              "train": {"steps": 1, "batch_size": 2, "out_dir": str(tmp_path / "run"), "progress": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    code = main(["train", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mmopd: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return code, lines[0]


def test_a_run_whose_rollout_url_answers_a_page_stops_in_one_line_and_leaves_no_sync_dir(peer, tiny_text, tmp_path,
                                                                                        capsys):
    url, state = peer
    state["reply"] = _page
    code, line = _train(tiny_text, tmp_path, capsys, rollout={"engine": "vllm", "url": url})
    assert code == 1 and f"mmopd: stopped: vLLM at {url} answered /v1/models with HTTP 200 text/html, not JSON" in line
    # the sync folder made for the run (default_sync_dir: /dev/shm, or the temp dir) is gone
    made = [p for root in ("/dev/shm", tempfile.gettempdir()) for p in Path(root).glob(f"mmopd-sync-{os.getpid()}-*")]
    assert made == []


def _serving(path):
    """A peer whose /v1/models names `path` as vLLM does (id: the --model argument, root: the folder)."""
    return lambda h: _page(h, json.dumps({"object": "list", "data": [{"id": str(path), "root": str(path)}]}).encode(),
                           "application/json")


def test_a_teacher_server_serving_the_student_is_refused_in_one_line(peer, tiny_text, tmp_path, capsys):
    url, state = peer
    state["reply"] = _serving(tiny_text["student"])
    code, line = _train(tiny_text, tmp_path, capsys, teacher={"engine": "vllm", "url": url})
    assert code == 2 and f"the teacher server at {url} serves {tiny_text['student']}, which is student.path, not " \
                         f"teacher.path={tiny_text['teacher']}" in line


def test_a_served_teacher_of_another_shape_is_refused_and_an_unreadable_one_of_another_name_warned(tiny_text,
                                                                                                  tmp_path, caplog):
    teacher, student = str(tiny_text["teacher"]), str(tiny_text["student"])
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((tiny_text["teacher"] / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] * 2}))
    with pytest.raises(ConfigError, match=rf"serves {other}, whose hidden_size is {config['hidden_size'] * 2}, "
                                          rf"teacher.path's {config['hidden_size']}"):
        check_served_model("http://gpu-node:8000", teacher, student, {"id": "teacher", "root": str(other)})
    check_served_model("http://gpu-node:8000", teacher, student, {"id": "/models/teacher", "root": "/models/teacher"})
    assert "check that it is the same model" not in caplog.text  # another machine's path to a folder of that name
    check_served_model("http://gpu-node:8000", teacher, student,
                       {"id": "/models/qwen-0.5b", "root": "/models/qwen-0.5b"})
    assert "serves /models/qwen-0.5b, and teacher.path is" in caplog.text
    check_served_model("http://gpu-node:8000", student, student, {"id": student, "root": student})  # self-distillation
