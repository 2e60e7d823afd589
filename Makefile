# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install the CPU torch wheel FIRST, so nothing pulls CUDA packages.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cmoe-installed

.PHONY: demo test bench install clean

EXAMPLE_PLUGIN := plugins/examples/cmoe-example-router

$(STAMP): pyproject.toml $(EXAMPLE_PLUGIN)/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet ./$(EXAMPLE_PLUGIN)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cmoe unimed demo --fresh

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
