"""The colocated-engine tests run a `vllm.LLM` in the test process, so they run in vLLM's venv (`make test` runs
them there: `.venv-vllm/bin/python -m pytest tests/engines/colocated`); the main venv has no vLLM to import."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("vllm") else ["colocated"]
