"""The vLLM servers the engine tests share, and where the colocated tests run.

Each served model runs in one `vllm serve` per test process (SharedServers), not one per module: a server takes
about a minute to start. Every shared server is used by the tests of one module, and `make test` runs with
`--dist loadfile`, so under xdist one worker runs that module's tests, in order, and owns its server: the served
student's tests change the weights it serves, so two workers could not share one server at once anyway. (Not
`xdist_group` + `--dist loadgroup`: xdist 3.8 marks a group by rewriting `item._nodeid`, which pytest 9 no longer
reads, so the groups are silently ignored.) A server stops once the next test in the process uses none of its
fixtures, so at most one idles; the session's end stops the rest, on failure too. A kill test stops its shared
server and `revive`s it on the same port, so the tests after it find it running.

The colocated-engine tests run a `vllm.LLM` in the test process, so they run in vLLM's venv (`make test` runs
them there: `.venv-vllm/bin/python -m pytest tests/engines/colocated`); the main venv has no vLLM to import."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

from mmopd.engines.vllm.served import POOLING_ARGS
from tests.vllm_server import Server, start_server

collect_ignore = [] if importlib.util.find_spec("vllm") else ["colocated"]


class SharedServers:
    """One running server per name (the name of the fixture that hands it to tests), started on first use."""

    def __init__(self) -> None:
        self.servers: dict[str, Server] = {}
        self.launches: dict[str, tuple[Path, tuple[str, ...], dict[str, str], str]] = {}

    def get(self, name: str, model_dir: str | Path, extra_args: Sequence[str] = (),
            env: Mapping[str, str] | None = None, role: str = "") -> Server:
        """The server `name` serving `model_dir` with `extra_args` (with a `role`: `mmopd serve ROLE` of the config
        `model_dir`), started here if it is not running."""
        launch = (Path(model_dir), tuple(extra_args), dict(env or {}), role)
        if self.launches.setdefault(name, launch) != launch:
            raise ValueError(f"shared server {name!r} was started as {self.launches[name]}, not as {launch}")
        if name not in self.servers:
            self.servers[name] = start_server(model_dir, extra_args=extra_args, env=env, role=role)
        return self.revive(name)

    def revive(self, name: str) -> Server:
        """The server `name`, started again on its port if it was stopped, in the same Server object (the URL that
        tests and configs hold stays valid), once it has answered one completion: a fresh engine's first request
        can take longer than the 5 s a kill test's run allows (seen on a loaded machine); a pooling server's
        answers one pooling request instead."""
        server = self.servers[name]
        if server.process.poll() is None:
            return server
        model_dir, extra_args, env, role = self.launches[name]
        restarted = start_server(model_dir, port=int(server.url.rsplit(":", 1)[1]), extra_args=extra_args, env=env,
                                 role=role)
        server.process, server.log_path = restarted.process, restarted.log_path
        if " ".join(POOLING_ARGS[:2]) in server.log_path.read_text():  # a pooling server: no completions
            server.post("/pooling", {"input": [[1, 2]], "task": "token_embed"}, timeout=300)
        else:
            server.post("/v1/completions", {"prompt": [[1, 2]], "max_tokens": 1}, timeout=300)
        return server

    def stop_unused(self, fixturenames: Sequence[str]) -> None:
        """Stop the servers whose fixture is not among `fixturenames` (the next test's)."""
        for name, server in self.servers.items():
            if name not in fixturenames:
                server.stop()

    def stop_all(self) -> None:
        self.stop_unused(())


SHARED = SharedServers()  # one per test process: under xdist, each worker starts the servers of its modules


@pytest.fixture(scope="session")
def vllm_servers() -> Iterator[SharedServers]:
    """The process's shared servers; all stopped when the session ends (after a failure or Ctrl-C too)."""
    yield SHARED
    SHARED.stop_all()


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if nextitem is not None:
        SHARED.stop_unused(nextitem.fixturenames)
