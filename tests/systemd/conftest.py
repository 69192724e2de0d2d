"""Fixtures for the tests under a real systemd: the booted container and its units.

The tests run only under `make systemd-test`, which builds the container's root, installs
the working tree's wheel in it and names the root in TEND_SYSTEMD_ROOT; anywhere else
they skip, saying so. One container is booted for the whole run; each test installs the
units it needs and removes them afterwards, so the next one finds systemd as booted.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from .machine import Machine, booted

ROOT = os.environ.get("TEND_SYSTEMD_ROOT")
SKIP_REASON = (
    "needs the Debian container that `make systemd-test` builds and names in "
    "TEND_SYSTEMD_ROOT (run it as root)"
)
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
UNITS = REPO / "contrib" / "systemd"
SERVICE = "tend-poetry.service"
SOCKET = "tend-poetry.socket"
PYTHON = "/opt/tend/bin/python"  # the container's Python, with tend installed
CLIENTS = "/usr/local/lib/tend-tests/clients.py"
POEM = REPO / "src" / "tend" / "poetry" / "poems" / "ecstasy.txt"

T = TypeVar("T")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if ROOT is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


def wait_until(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.1) -> T:
    """Poll *predicate* until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s (last returned {value!r})")
        time.sleep(interval)
    return value


@pytest.fixture(scope="session")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """The container, booted once for the whole run."""
    assert ROOT is not None
    log = tmp_path_factory.mktemp("container") / "nspawn.log"
    with booted(Path(ROOT), log) as machine:
        machine.write(CLIENTS, (HERE / "clients.py").read_text())
        yield machine


class Systemd:
    """systemctl and journalctl in the container, and the unit files a test installed."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.files: list[str] = []
        self.units: list[str] = []
        # Only what was logged from here on is this test's.
        self.cursor = machine.run("journalctl", "-n", "0", "--show-cursor", "--quiet").stdout
        self.cursor = self.cursor.rsplit("cursor:", 1)[-1].strip()

    def install(self, name: str, text: str) -> None:
        """Put the unit file *name* in /etc/systemd/system (not yet reloaded)."""
        self.write(f"/etc/systemd/system/{name}", text)
        self.units.append(name)

    def install_shipped(self) -> None:
        """The units of contrib/systemd, as shipped, in /etc/systemd/system."""
        for name in (SOCKET, SERVICE):
            self.install(name, (UNITS / name).read_text())

    def drop_in(self, unit: str, text: str) -> None:
        """Add ``UNIT.d/test.conf`` with *text*: the shipped unit, changed as it says."""
        self.write(f"/etc/systemd/system/{unit}.d/test.conf", text)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        self.machine.write(path, text, mode)
        self.files.append(path)

    def __call__(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        """Run systemctl with *args*; return what it printed."""
        result = self.machine.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)
        return result.stdout + result.stderr

    def reload(self) -> None:
        self("daemon-reload")

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        output = self("show", unit, "--property=" + ",".join(properties))
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def state(self, unit: str = SERVICE) -> str:
        """``ActiveState/SubState``: ``active/running``, ``inactive/dead``, ..."""
        shown = self.show(unit, "ActiveState", "SubState")
        return f"{shown['ActiveState']}/{shown['SubState']}"

    def main_pid(self, unit: str = SERVICE) -> int:
        return int(self.show(unit, "MainPID")["MainPID"])

    def journal(self, unit: str = SERVICE) -> list[dict[str, str]]:
        """The unit's journal entries since the test began, systemd's and the service's."""
        output = self.machine.run(
            "journalctl",
            "--no-pager",
            "--all",  # else a field longer than 4 KiB is shown as null
            "-o",
            "json",
            "--after-cursor",
            self.cursor,
            "-u",
            unit,
        ).stdout
        entries = []
        for line in output.splitlines():
            entry = json.loads(line)
            message = entry.get("MESSAGE")
            if isinstance(message, list):  # not UTF-8: journald gives the bytes
                entry["MESSAGE"] = bytes(message).decode(errors="replace")
            entries.append(entry)
        return entries

    def messages(self, unit: str = SERVICE) -> list[str]:
        return [entry["MESSAGE"] for entry in self.journal(unit)]

    def journal_text(self, unit: str = SERVICE) -> str:
        return "\n".join(self.messages(unit))

    def wait_for_journal(self, pattern: str, unit: str = SERVICE, timeout: float = 20.0) -> str:
        """Wait until a journal line of *unit* matches *pattern*; return that line."""

        def find() -> str | None:
            for message in self.messages(unit):
                if re.search(pattern, message):
                    return message
            return None

        try:
            return wait_until(find, timeout)
        except AssertionError:
            raise AssertionError(
                f"no journal line matching {pattern!r} within {timeout} s:\n"
                + self.journal_text(unit)
            ) from None

    def clean_up(self) -> None:
        for unit in reversed(self.units):
            self("stop", unit, check=False)
        for unit in self.units:
            self("disable", unit, check=False)
            self("reset-failed", unit, check=False)
        for path in self.files:
            self.machine.remove(path)
            if path.endswith(".d/test.conf"):
                self.machine.remove(path.rsplit("/", 1)[0])
        self.reload()


@pytest.fixture
def systemd(machine: Machine) -> Iterator[Systemd]:
    """systemctl and the journal in the container; the test's units are removed after it."""
    handle = Systemd(machine)
    try:
        yield handle
    finally:
        handle.clean_up()


def fetch(machine: Machine, port: int = 10000, timeout: float = 10.0) -> bytes:
    """Fetch the poem on *port* in the container, with get-poetry; the poem's bytes."""
    result = machine.run(
        "get-poetry", "--timeout", str(timeout), str(port), timeout=timeout + 10, check=False
    )
    assert result.returncode == 0, f"get-poetry failed: {result.stderr}"
    return result.stdout.encode()


def unit_without_socket(service: str, port: str) -> str:
    """The shipped service unit as the README's "Without socket activation" makes it.

    Drop the socket unit's Requires= and After=, enable it with the machine rather than
    with the socket, and give tend a port of its own.
    """
    lines = [line for line in service.splitlines() if not line.startswith(("Requires=", "After="))]
    text = "\n".join(lines) + "\n"
    text = text.replace("Also=tend-poetry.socket", "WantedBy=multi-user.target")
    return text.replace("--port systemd:name=poetry", f"--port {port}")


def binding_below_1024(service: str) -> str:
    """*service* changed as the README says for a port below 1024 that tend binds itself.

    The capability, and no private user namespace: a capability held there does not
    count in the machine's network namespace.
    """
    text = service.replace("\nPrivateUsers=yes\n", "\n")
    text = text.replace(
        "\nCapabilityBoundingSet=\n", "\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"
    )
    return text.replace("\nAmbientCapabilities=\n", "\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n")
