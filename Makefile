# `make demo` runs the main job on a shipped default; `make test` runs the test suite.
# Both create .venv on first use from the lock (requirements.lock: torch 2.13.0 CPU first, then
# the project with its dev extras, every package at its locked version). `make lock` refreshes the
# lock on purpose: it resolves pyproject.toml's ranges anew in a scratch venv and freezes it.
PYTHON ?= python3
PIP_VERSION := 26.3
LOCK := requirements.lock
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q pip==$(PIP_VERSION)
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev,docs]"
	touch $@

.PHONY: install lock demo test lint bench docs
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q pip==$(PIP_VERSION)
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q ".[dev,docs]"
	{ echo "# make lock: every package of '.[dev,docs]' at the version resolved on $$(date -u +%F)"; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -v '^behemoth-interp' | sed 's/+cpu$$//'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/behemoth-interp demo

test: $(BIN)/.installed
	$(BIN)/pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check behemoth_interp tests benchmarks experiments docs/hooks
	$(BIN)/ruff format --check behemoth_interp tests benchmarks experiments docs/hooks

# the docs site in site/, its tutorials executed on the shipped models (tests/test_docs.py builds
# it the same way and opens a tutorial in headless Chromium)
docs: $(BIN)/.installed
	$(BIN)/mkdocs build --strict --site-dir site

bench: $(BIN)/.installed
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done
