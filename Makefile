# Two commands a new user needs: `make run` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamp files record that .venv holds the project (and its dev extras) as of pyproject.toml.
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.dev-installed

# Debian programs the tests run for real, with the package that brings each one
# (strace, prlimit and timeout for the torture suite's faults and guards; supervisord,
# start-stop-daemon and logrotate for the README's recipes; curl, wget, lftp, ncat and nc
# as clients of tend web, ftp, socks and portforward and of the poetry server; socat
# as tend manhole's).
SYSTEM_TOOLS := systemd-socket-activate:systemd openssl:openssl ss:iproute2 setpriv:util-linux cc:gcc \
	strace:strace prlimit:util-linux timeout:coreutils \
	supervisord:supervisor start-stop-daemon:dpkg logrotate:logrotate nc:netcat-openbsd curl:curl wget:wget lftp:lftp ncat:ncat socat:socat
# What `make systemd-test` needs on the host to build and boot its Debian container.
SYSTEMD_TEST_TOOLS := debootstrap:debootstrap systemd-nspawn:systemd-container nsenter:util-linux
SYSTEMD_ROOT := build/systemd-root
WHEELS := build/wheels

# A second Python for `make test-3.13`: python3.13 on PATH, else pyenv's, else none; the
# first that runs (pyenv's shim is on PATH even where 3.13 is not its version, and fails).
PYTHON313 ?= $(shell for p in $$(command -v python3.13) $(HOME)/.pyenv/versions/3.13*/bin/python3.13; do \
	"$$p" -c '' 2>/dev/null && { echo "$$p"; break; }; done)
VENV313 := .venv-3.13

.PHONY: run test test-3.13 torture torture-short bench clean system-tools systemd-test

run: $(INSTALLED)
	$(BIN)/tend --nodaemon poetry

test: $(DEV_INSTALLED) system-tools
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy --strict src/
	$(BIN)/pytest --ignore=tests/torture --ignore=tests/systemd
	$(BIN)/python tests/torture/run.py --short
	@$(MAKE) --no-print-directory systemd-test

# The hardening suite (tests/torture): every enumerated bad input, hypothesis at thousands
# of examples, the security checks (as root) and the fault scenarios at full scale, then a
# table of figures. About 8 minutes on 2 cores; `make torture-short` (in `make test`) runs
# a sample in about 2 minutes.
torture: $(DEV_INSTALLED) system-tools
	$(BIN)/python tests/torture/run.py

torture-short: $(DEV_INSTALLED) system-tools
	$(BIN)/python tests/torture/run.py --short

# The same checks and tests under Python 3.13, in .venv-3.13 (tend supports 3.11 and newer).
test-3.13: system-tools
	@if [ -z "$(PYTHON313)" ]; then \
		echo "test-3.13: skipped: no python3.13 found (on PATH or in pyenv); give PYTHON313=/path/to/python3.13"; \
		exit 0; \
	fi; \
	set -e; \
	[ -x $(VENV313)/bin/python ] || $(PYTHON313) -m venv $(VENV313); \
	[ -f $(VENV313)/.dev-installed ] && [ $(VENV313)/.dev-installed -nt pyproject.toml ] || { \
		$(VENV313)/bin/python -m pip install --quiet --upgrade pip; \
		$(VENV313)/bin/python -m pip install --quiet -e '.[dev]'; \
		touch $(VENV313)/.dev-installed $(VENV313)/.installed; }; \
	echo "test-3.13: $$($(VENV313)/bin/python --version)"; \
	$(VENV313)/bin/mypy --strict --python-version 3.13 src/; \
	$(VENV313)/bin/pytest -p no:cacheprovider --ignore=tests/torture

# The contrib/systemd units under a real systemd (PID 1 of a Debian bookworm container):
# readiness, stop, restart, socket activation, the watchdog, journald, users and the
# security score (tests/systemd). The first run builds the container's root in
# build/systemd-root (debootstrap, about 2 minutes); later runs reuse it, and take about
# 1.5 minutes. Needs root; as another user, or without debootstrap and systemd-nspawn and
# a way to install them, it says why in one line and skips.
systemd-test: $(DEV_INSTALLED)
	@if [ "$$(id -u)" != 0 ]; then \
		echo "systemd-test: skipped: needs root to build and boot a container (debootstrap, systemd-nspawn)"; \
		exit 0; \
	fi; \
	missing=""; for pair in $(SYSTEMD_TEST_TOOLS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if ! command -v apt-get >/dev/null; then \
			echo "systemd-test: skipped: missing$$missing, and no apt-get to install them"; \
			exit 0; \
		fi; \
		echo "installing:$$missing"; \
		if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }; then \
			echo "systemd-test: skipped: could not install$$missing with apt-get"; \
			exit 0; \
		fi; \
	fi; \
	set -e; \
	rm -rf $(WHEELS); \
	$(BIN)/python -m pip wheel --quiet --no-deps --disable-pip-version-check -w $(WHEELS) .; \
	$(BIN)/python tests/systemd/machine.py prepare $(SYSTEMD_ROOT) $$(ls $(WHEELS)/tend-*.whl); \
	TEND_SYSTEMD_ROOT=$(SYSTEMD_ROOT) $(BIN)/pytest -p no:cacheprovider tests/systemd

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
	rm -rf $(VENV) $(VENV313) build dist bench/build
