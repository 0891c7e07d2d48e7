# The two commands a user needs: `make demo` and `make test`. Both build .venv first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.twodrl-installed
export DS_ACCELERATOR ?= cpu
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
# No WANDB_MODE here: wandb runs offline unless WANDB_API_KEY is set (twodrl.tracking.wandb_mode).
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu-lock.txt scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

demo: install
	$(VENV)/bin/twodrl run configs/quickstart.yaml --run-dir runs/quickstart

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -q -m "not integration and not e2e" tests

bench: install
	$(PY) -m benchmarks --json runs/benchmarks.json

clean:
	rm -rf runs .pytest_cache
