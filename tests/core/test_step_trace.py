"""docs/architecture.md's trace of one step is the path the code takes (tests/step_trace.py derives it)."""

from tests.step_trace import documented, trace_step


def test_the_architecture_page_gives_the_files_and_functions_one_step_goes_through(tmp_path):
    trace = trace_step(tmp_path)
    assert documented() == trace.markdown(), "docs/architecture.md is stale: rerun `python -m tests.step_trace`"
    # the objective's row, the teacher's need, the sampling and the loss are resolved once (objectives.Plan), at start
    assert not {"mmopd/step/objective_table.py", "mmopd/config.py"} & set(trace.files), trace.files
