# Two commands a new user needs: `make run` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamp files record that .venv holds the project (and its dev extras) as of pyproject.toml.
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.dev-installed

.PHONY: run test lint bench clean

run: $(INSTALLED)
	$(BIN)/tend --nodaemon poetry

test: $(DEV_INSTALLED)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy --strict src/
	$(BIN)/pytest

bench: $(DEV_INSTALLED)
	$(MAKE) -C bench PYTHON=$(abspath $(BIN)/python)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEV_INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(INSTALLED)

clean:
	rm -rf $(VENV) build dist bench/build
