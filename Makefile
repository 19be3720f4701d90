# The two commands of the README's quick start:
#   make run    set up .venv on first use, then start the gateway on http://127.0.0.1:8000
#   make test   set up .venv (with test extras) on first use, then run the whole suite
# and, for the work in between:
#   make test-fast  the tests that start no process (unit + simulation), in seconds
#   make lint       ruff check, ruff format --check (on FORMATTED), mypy: what CI runs first
#   make format     ruff format + the safe lint fixes, on FORMATTED
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Files ruff format keeps in shape (`make format`, checked by `make lint`): the whole tree.
FORMATTED := .

.PHONY: run test test-fast lint format bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/python run.py

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check $(FORMATTED)
	$(BIN)/mypy

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format $(FORMATTED)

bench: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache
