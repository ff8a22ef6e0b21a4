# Set-up is part of both main targets: a fresh machine with only Python needs nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ppcl-installed

.PHONY: demo test setup clean

demo: $(STAMP)
	$(BIN)/ppcl demo --out ppcl-demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q

setup: $(STAMP)

# torch first and pinned: this machine kind has a local CPU build of 2.13.0, and an unpinned torch would pull CUDA.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) ppcl-demo .pytest_cache
