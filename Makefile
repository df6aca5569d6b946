# Two entry points: `make up` (set up .venv and run the cluster) and `make test`.
# Everything installs itself into .venv; nothing is needed beyond Python 3.11.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LOCK := requirements.lock
ARGS ?=

# torch stays out of the lock (pip-compile --unsafe-package torch): which build is right
# depends on the machine (CPU only, or one CUDA version), and a hashed lock would tie every
# machine to the files of one build. It is installed first, by version, and pip takes the build
# its configuration finds: PyPI's default (CUDA) build, a local CPU build where pip's
# find-links holds one, or PyTorch's CPU index with
# `make TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'`.
# The lock is resolved against this version (make lock), so torch's own needs are pinned too.
TORCH := torch==2.13.0
TORCH_PIP_ARGS ?=
PIP := pip==26.3
PIP_TOOLS := pip-tools==7.6.2
LOCK_TOOLS := build/lock-tools
LOCK_ARGS ?=
# `make gpu-check` runs on a GPU machine with its own torch, transformers, peft and
# safetensors; everything else comes from wheels downloaded here for CPython 3.11 and 3.12.
GPU_WHEELS := .gpu-wheels
GPU_PLATFORMS := manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
GPU_PY ?= python3

.PHONY: up test lint typecheck unit bench-bus lock gpu-wheels gpu-check clean

# The lock pins every package but torch, with hashes; --no-deps keeps pip from adding anything
# it does not list, and `pip check` proves the set consistent.
$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP)
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) $(TORCH)
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
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
	$(BIN)/python -m pytest -q --durations=15

test: lint typecheck unit

bench-bus: $(STAMP)
	$(BIN)/vajra bench bus --json bench-results/bus.json

# Re-resolve requirements.lock from pyproject.toml (the dev extra and the build requirements
# included) for this Python on Linux x86_64. Pins still allowed by pyproject.toml are kept;
# `make lock LOCK_ARGS=--upgrade` moves every pin to the newest release allowed. pip-compile's
# warning that torch is not pinned is expected: the stamp above installs it first.
lock:
	$(PY) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/python -m pip install -q $(PIP) $(PIP_TOOLS)
	echo '$(TORCH)' > build/torch-constraint.txt
	CUSTOM_COMPILE_COMMAND='make lock' $(LOCK_TOOLS)/bin/pip-compile --quiet --extra dev \
		--all-build-deps --generate-hashes --strip-extras --unsafe-package torch \
		--constraint build/torch-constraint.txt --no-emit-index-url --no-emit-find-links \
		$(LOCK_ARGS) --output-file $(LOCK) pyproject.toml

# The wheels of requirements-gpu.txt at their locked versions, for either Python.
gpu-wheels: $(LOCK) requirements-gpu.txt
	rm -rf $(GPU_WHEELS) && mkdir -p build
	sed -n 's/^\([A-Za-z0-9._-]*==[^ ]*\).*/\1/p' $(LOCK) > build/lock-pins.txt
	for version in 3.11 3.12; do \
		$(PY) -m pip download -q --only-binary=:all: --implementation cp \
			--python-version $$version $(addprefix --platform ,$(GPU_PLATFORMS)) \
			-c build/lock-pins.txt -r requirements-gpu.txt -d $(GPU_WHEELS) || exit 1; \
	done

# On the GPU machine, .gpu-wheels copied along: the CUDA tests and GPU benchmarks, JSON in
# bench-results/gpu/. `python3 -m vajra.bench.gpu_check --dry-run` runs the same plan on a CPU.
gpu-check:
	$(GPU_PY) -m vajra.bench.gpu_check --wheels $(GPU_WHEELS) --out bench-results/gpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
