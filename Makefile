# Two commands on a fresh machine:
#   make quickstart   set up .venv and run configs/quickstart.yaml on local Ray + local MLflow
#   make test         set up .venv and run the test suite
# Dependencies install from requirements.lock (every extra, fully pinned, every file checked
# against its sha256: pip's --require-hashes); `make lock` regenerates it from pyproject.toml.
# Unverified: the pip that does the checking (upgraded from the index first) and strata itself
# (this checkout, installed without dependencies and without build isolation, so its build
# backend is the lock's setuptools).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test lint setup lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

quickstart: setup
	$(BIN)/strata run configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest

# ruff's lint rules and its formatting, and the layers of docs/architecture.md as import-linter
# contracts (pyproject.toml).
lint: setup
	$(BIN)/ruff check pipeline tests bench jobs deploy
	$(BIN)/ruff format --check pipeline tests bench jobs deploy
	$(BIN)/lint-imports

# In a throwaway venv (pip-tools' own dependencies must not move the project's); pip's configured
# constraints file, where a machine has one (this one caps torch at the wheel on its disk), holds.
PIP_CONSTRAINT_FILE := $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global.constraint='\(.*\)'$$/\1/p")
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" .lock-venv/bin/pip-compile --quiet --upgrade --generate-hashes --allow-unsafe --all-extras --strip-extras \
		--no-emit-index-url --no-emit-find-links $(if $(PIP_CONSTRAINT_FILE),-c $(PIP_CONSTRAINT_FILE)) \
		--output-file requirements.lock pyproject.toml
	rm -rf .lock-venv

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache
