# Two commands on a fresh machine:
#   make quickstart   set up .venv and run configs/quickstart.yaml on local Ray + local MLflow
#   make test         set up .venv and run the test suite
# Dependencies install at the versions in requirements.lock (every extra, fully pinned);
# `make lock` regenerates it from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test lint setup lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

quickstart: setup
	$(BIN)/strata run configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest

# ruff's lint rules, and the layers of docs/architecture.md as import-linter contracts (pyproject.toml).
lint: setup
	$(BIN)/ruff check pipeline tests bench jobs
	$(BIN)/lint-imports

# In a throwaway venv (pip-tools' own dependencies must not move the project's); pip's configured
# constraints file, where a machine has one (this one caps torch at the wheel on its disk), holds.
PIP_CONSTRAINT_FILE := $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global.constraint='\(.*\)'$$/\1/p")
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" .lock-venv/bin/pip-compile --quiet --upgrade --all-extras --strip-extras \
		--no-emit-index-url --no-emit-find-links $(if $(PIP_CONSTRAINT_FILE),-c $(PIP_CONSTRAINT_FILE)) \
		--output-file requirements.lock pyproject.toml
	rm -rf .lock-venv

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache
