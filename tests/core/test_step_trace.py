"""docs/architecture.md's trace of one step is the path the code takes (tests/step_trace.py derives it)."""

from tests.step_trace import documented, trace_step


def test_the_architecture_page_gives_the_files_and_functions_one_step_goes_through(tmp_path):
    derived = trace_step(tmp_path).markdown()
    assert documented() == derived, "docs/architecture.md is stale: rerun `python -m tests.step_trace`, paste it"
