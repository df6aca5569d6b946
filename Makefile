# Two entry points: `make up` (set up .venv and run the cluster) and `make test`.
# Everything installs itself into .venv; nothing is needed beyond Python 3.11.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: up test lint typecheck unit bench-bus clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Without CUDA, take the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch==2.13.0; fi
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/vajra up $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check vajra tests simulations
	$(BIN)/ruff format --check vajra tests simulations
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench-bus: $(STAMP)
	$(BIN)/vajra bench bus --json bench-results/bus.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
