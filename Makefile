# `make demo` installs mmopd into .venv and runs the text demo; `make test` runs the test suite.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: install demo test test-fast

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/mmopd demo text

# two workers, one thread each (small models run fastest on one thread per process); idle workers steal tests
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=15

# the quick inner loop: everything but the tests marked slow (whole demos, benchmarks, kill tests), ~2 minutes
test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow"
