# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install torch==2.13.0 FIRST: where pip finds the CPU wheel (here and in CI), nothing
# pulls CUDA packages; from plain PyPI add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cmoe-installed

.PHONY: demo test bench install clean java

EXAMPLE_PLUGIN := plugins/examples/cmoe-example-router

$(STAMP): pyproject.toml $(EXAMPLE_PLUGIN)/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet ./$(EXAMPLE_PLUGIN)
	$(MAKE) --no-print-directory java
	touch $(STAMP)

# The Uni-Med caption metrics (pycocoevalcap's PTB tokenizer and METEOR 1.5) run on Java: install Debian's JRE
# when java is missing and we are root with apt (as in CI); otherwise say how, and the tables say it too.
java:
	@command -v java >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless; \
	else \
		echo "note: no Java runtime; the COCO caption metrics of reports (BLEU, METEOR, ROUGE-L, CIDEr) need one:" \
		     "sudo apt-get install -y default-jre-headless, or any Java 8+ on the PATH"; \
	fi

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cmoe unimed demo --fresh

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
