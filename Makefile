# Both targets create or reuse .venv and install pinned dependencies themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-base
TSTAMP := $(VENV)/.stamp-test

.PHONY: demo test test-slow lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(TSTAMP): $(STAMP) requirements-test.lock
	$(BIN)/pip install -q -r requirements-test.lock
	touch $@

demo: $(STAMP)
	$(BIN)/streamcqsa demo

# The unit suite: every capability, no test marked slow (see tests/conftest.py).
test: $(TSTAMP)
	$(BIN)/ruff check streamcqsa tests bench
	$(BIN)/python -m pytest -q -m "not slow"

# The heavy cases: larger plans, deeper trees, more kills, the bench smoke run.
test-slow: $(TSTAMP)
	$(BIN)/python -m pytest -q -m "slow and not gpu"

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
