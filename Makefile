# Two commands a new user needs: `make run` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamp files record that .venv holds the project (and its dev extras) as of pyproject.toml.
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.dev-installed

# Debian programs the tests run for real, with the package that brings each one.
SYSTEM_TOOLS := systemd-socket-activate:systemd openssl:openssl ss:iproute2 setpriv:util-linux cc:gcc

.PHONY: run test bench clean system-tools

run: $(INSTALLED)
	$(BIN)/tend --nodaemon poetry

test: $(DEV_INSTALLED) system-tools
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

# Installs what is missing when run as root with apt-get; otherwise the tests that need a
# missing program skip and say why.
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "not installed:$$missing (the tests that need them will skip)"; \
		fi; \
	fi

clean:
	rm -rf $(VENV) build dist bench/build
