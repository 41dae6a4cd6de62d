# Two commands on a fresh machine:
#   make quickstart   set up .venv and run configs/quickstart.yaml on local Ray + local MLflow
#   make test         set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

quickstart: setup
	$(BIN)/strata run configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache
