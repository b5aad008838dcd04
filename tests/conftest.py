"""Shared fixtures: a tiny text task with a (random) teacher and student saved by path; and `--times-file`, where
a run keeps its slowest tests (`make test` writes .test-times/main.txt and .test-times/colocated.txt)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from mmopd.config import load_config
from modalities.text import toy
from tests.gemma_models import gemma_pair, real_model_turn

pytest_plugins = ("tests.vlm.fixtures",)  # the VLM fixtures: tiny data and model pairs of every family
SLOWEST = 30
REAL_MODEL = "real-model"  # the work unit of the modules that run Gemma 3 270M (fixture `gemma_real`):
REAL_MODEL_MODULES = ("tests/engines/test_vllm_gemma_rollout.py", "tests/engines/test_vllm_gemma_teacher.py",
                      "tests/text/test_gemma_real.py")
# Modules whose tests take a minute or more in all (.test-times/main.txt), heaviest first: `make test` sends them
# out first, so that the two workers end together instead of one finishing a demo alone.
HEAVY_FIRST = ("tests/e2e/test_demo_text.py", "tests/e2e/test_demo_vlm.py", "tests/engines/test_vllm_served.py",
               "tests/e2e/test_image_tokens_demo.py", "tests/e2e/test_sharding.py", "tests/engines/test_vllm_teacher.py")


def pytest_addoption(parser) -> None:
    parser.addoption("--times-file", metavar="PATH", help=f"write the {SLOWEST} slowest tests (setup + call + "
                     "teardown, seconds) to PATH at the end of the run")


def _unit(path: str) -> str:
    """The work unit of a test module's path: the real model's, or the module's own."""
    return REAL_MODEL if path in REAL_MODEL_MODULES else path


@pytest.hookimpl(optionalhook=True)  # pytest -p no:xdist (the colocated suite) knows no such hook
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s `-n 2 --dist loadfile`: a module's tests share a worker (its module-scoped vLLM servers start
    once), and the modules that run the real model share one too: they take turns on it (`real_model_turn`), and on
    two workers the second would wait for the first with its core idle. (xdist's own `--dist loadgroup` does not
    group here: with this pytest its marks never reach the test ids.)"""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Units(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid.split("::", 1)[0])

    return Units(config, log)


def pytest_collection_modifyitems(items) -> None:
    """Units go out in this order: the real model first, then HEAVY_FIRST, then the rest in collection order. A
    module that takes the real model (fixture `gemma_real`) must be listed in REAL_MODEL_MODULES."""
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if "gemma_real" in getattr(item, "fixturenames", ()) and path not in REAL_MODEL_MODULES:
            raise pytest.UsageError(f"{path} runs the real model (gemma_real): add it to REAL_MODEL_MODULES in "
                                    "tests/conftest.py, so that it shares the real model's worker")
    rank = {REAL_MODEL: 0, **{path: i + 1 for i, path in enumerate(HEAVY_FIRST)}}
    items.sort(key=lambda item: rank.get(_unit(item.nodeid.split("::", 1)[0]), len(rank)))  # stable sort


def pytest_terminal_summary(terminalreporter, config) -> None:
    """The controller (not an xdist worker, whose reports the controller also receives) writes --times-file."""
    path = config.getoption("--times-file")
    if not path or hasattr(config, "workerinput"):
        return
    phases: dict[str, dict[str, float]] = defaultdict(dict)
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) in ("setup", "call", "teardown"):
                phases[report.nodeid][report.when] = report.duration
    slowest = sorted(phases.items(), key=lambda item: -sum(item[1].values()))[:SLOWEST]
    lines = [f"{sum(p.values()):8.1f} s  {nodeid}  (setup {p.get('setup', 0):.1f}, call {p.get('call', 0):.1f}, "
             f"teardown {p.get('teardown', 0):.1f})" for nodeid, p in slowest]
    total = sum(sum(p.values()) for p in phases.values())
    header = f"# the {len(slowest)} slowest of {len(phases)} tests; {total:.0f} s of test time in all (all workers)"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join([header, *lines]) + "\n")
    terminalreporter.write_line(f"slowest {len(slowest)} tests written to {path}")


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (tiny models run fastest so, and the test cores are shared);
    modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, two tiny Qwen3 models (teacher wider than student) and train/eval JSONL."""
    return toy.build_untrained(tmp_path_factory.mktemp("tiny_text"))


@pytest.fixture
def text_config(tiny_text, tmp_path):
    """A factory of validated configs over the tiny text task, tiny enough to run in a second or two."""

    def make(**overrides):
        base = {
            "modality": "text",
            "student.path": str(tiny_text["student"]),
            "teacher.path": str(tiny_text["teacher"]),
            "data.train": str(tiny_text["train"]),
            "data.eval": str(tiny_text["eval"]),
            "rollout.max_new_tokens": 8,
            "train.steps": 2,
            "train.batch_size": 4,
            "train.eval_every": 0,
            "train.save_every": 0,
            "train.out_dir": str(tmp_path / "run"),
            "train.progress": False,
            "train.warmup": 0,
        }
        base.update(overrides)
        return load_config(None, base)

    return make


@pytest.fixture(scope="module")
def gemma_real() -> dict[str, Path]:
    """Gemma 3 270M and its 7-layer student (tests/gemma_models.py, built once per clone), with this module holding
    the one turn to run the real model: a module's server and models live inside the turn."""
    with real_model_turn():
        yield gemma_pair()
