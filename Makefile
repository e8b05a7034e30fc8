# The two commands: `make run` and `make test`. Both bootstrap .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck unit fuzz crash bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "chatsessions needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(BIN)/chatsessions serve

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy

unit: $(VENV)/.dev-installed
	$(BIN)/pytest -q

test: lint typecheck unit

# Many more schemathesis examples and state-machine runs than `make test` (minutes, not seconds).
fuzz: $(VENV)/.dev-installed
	CHATSESSIONS_FUZZ=1 $(BIN)/pytest -q tests/security/test_schemathesis.py tests/security/test_stateful.py

# kill -9 under load, CYCLES times (`make crash CYCLES=500`), after POWERLOSS_ITERATIONS random power cuts.
CYCLES ?= 100
POWERLOSS_ITERATIONS ?= 1000
crash: $(VENV)/.dev-installed
	POWERLOSS_ITERATIONS=$(POWERLOSS_ITERATIONS) $(BIN)/python -m tests.crash.powerloss
	$(BIN)/python -m tests.crash.harness --cycles $(CYCLES)

# Needs wrk (apt-get install -y wrk). BENCH_SECONDS, BENCH_ROUNDS, BENCH_ONLY: see bench/run.py.
bench: $(VENV)/.dev-installed
	$(BIN)/python bench/run.py
	$(BIN)/python bench/search.py
	$(BIN)/python bench/live.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
