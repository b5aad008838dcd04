"""`make test`: the main suite and the colocated vLLM suite, side by side.

    python -m tests.suites [--main-python .venv/bin/python] [--vllm-python .venv-vllm/bin/python]

The main suite runs in the main venv on two xdist workers. The colocated suite runs a `vllm.LLM` inside the test
process, so it runs in vLLM's venv (which pins another torch), one test at a time: two engines at once found too
little free memory. Run one after the other, the colocated suite kept one core idle for its whole length (8 of
24 minutes); here it starts beside the main suite, its output goes to .test-times/colocated.log, and that log is
printed when the main suite is done. Both suites always run to the end; the exit status is the main suite's if
it failed, else the colocated suite's. Ctrl-C stops both. Each suite writes its 30 slowest tests to .test-times/
(main.txt, colocated.txt), as `--times-file` does.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMES = ROOT / ".test-times"
MAIN_ARGS = ("-q", "-n", "2", "--dist", "loadfile", "--no-loadscope-reorder", "--durations=15",
             "--times-file", str(TIMES / "main.txt"))
COLOCATED_ARGS = ("-q", "-p", "no:xdist", "--durations=10", "tests/engines/colocated",
                  "--times-file", str(TIMES / "colocated.txt"))


def run(main_python: Path, vllm_python: Path) -> int:
    """Both suites at once; the first failing status (main first), else 0."""
    TIMES.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # small models run fastest on one thread per process
    log_path = TIMES / "colocated.log"
    with log_path.open("w") as log:
        colocated = subprocess.Popen([str(vllm_python), "-m", "pytest", *COLOCATED_ARGS], cwd=ROOT, env=env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        main = subprocess.run([str(main_python), "-m", "pytest", *MAIN_ARGS], cwd=ROOT, env=env).returncode
        print(f"\n== the colocated vLLM suite ({log_path.relative_to(ROOT)}), run beside the main suite:", flush=True)
        status = colocated.wait()
    finally:
        if colocated.poll() is None:  # Ctrl-C, or the main suite could not start
            os.killpg(colocated.pid, signal.SIGTERM)
            colocated.wait()
    sys.stdout.write(log_path.read_text(errors="replace"))
    return main or status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main-python", type=Path, default=ROOT / ".venv" / "bin" / "python")
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    args = parser.parse_args(argv)
    return run(args.main_python, args.vllm_python)


if __name__ == "__main__":
    sys.exit(main())
