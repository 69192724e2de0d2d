"""The contrib/systemd units as shipped, under systemd as PID 1: start, stop, a crash."""

from __future__ import annotations

import json
import time

from .conftest import (
    CLIENTS,
    POEM,
    PYTHON,
    SERVICE,
    SOCKET,
    UNITS,
    Systemd,
    fetch,
    unit_without_socket,
    wait_until,
)
from .machine import Machine

# The slow poem: 100 bytes every 0.2 s, so the 2807 bytes take about 5.6 s, well inside
# the default drain of 10 s.
SLOW = "--chunk-size 100 --delay 0.2"

# An app file whose start takes 2 s before its listener serves: a Type=simple unit would
# be "active" at once; a Type=notify one only when tend says READY=1.
SLOW_START = """
import asyncio

import tend
from tend.poetry import DEFAULT_POEM
from tend.poetry.server import PoetryFactory, PoetryService


class SlowStart(tend.Service):
    async def start_service(self):
        await asyncio.sleep(2)
        await super().start_service()


application = tend.Application("slowstart")
SlowStart().set_service_parent(application)
poetry = PoetryService(DEFAULT_POEM)
poetry.set_service_parent(application)
tend.TCPServer(10000, PoetryFactory(poetry), interface="localhost").set_service_parent(application)
"""


def test_the_shipped_units_pass_systemd_analyze_verify(systemd: Systemd) -> None:
    """systemd-analyze verify finds nothing to say about the units, as the README runs it."""
    systemd.install_shipped()
    result = systemd.machine.run(
        "systemd-analyze",
        "verify",
        f"/etc/systemd/system/{SOCKET}",
        f"/etc/systemd/system/{SERVICE}",
        check=False,
    )
    # man pages are not installed in the container: Documentation= is not what is tested.
    complaints = [
        line for line in result.stderr.splitlines() if "man systemd." not in line and line.strip()
    ]
    assert complaints == [], result.stderr


def test_the_service_is_active_only_once_its_port_serves(systemd: Systemd) -> None:
    """`systemctl start` returns, active (running), only after tend reported ready."""
    systemd.install_shipped()
    systemd.reload()
    systemd("start", SOCKET)
    assert systemd.state() == "inactive/dead"
    systemd("start", SERVICE)
    assert systemd.state() == "active/running"
    assert 'Status: "serving PoetryFactory on [::]:10000"' in systemd("status", SERVICE)
    messages = systemd.messages()
    serving = next(i for i, m in enumerate(messages) if "PoetryFactory starting on" in m)
    started = next(i for i, m in enumerate(messages) if m.startswith("Started tend-poetry"))
    assert serving < started, "\n".join(messages)
    assert fetch(systemd.machine, timeout=2) == POEM.read_bytes()


def test_a_slow_start_stays_activating_until_ready(systemd: Systemd) -> None:
    """With its own port, tend is `activating` until its services start, then serves at once."""
    systemd.write("/etc/tend/slowstart.py", SLOW_START)
    service = unit_without_socket((UNITS / SERVICE).read_text(), "tcp:10000")
    service = service.replace(
        "poetry --port tcp:10000", "-y /etc/tend/slowstart.py"
    )  # the app file listens on 10000 itself
    systemd.install(SERVICE, service)
    systemd.reload()
    began = time.monotonic()
    systemd("start", "--no-block", SERVICE)
    states = [systemd.state()]
    while states[-1] != "active/running" and time.monotonic() - began < 20:
        states.append(systemd.state())
    assert "activating/start" in states
    assert states[-1] == "active/running", states
    assert time.monotonic() - began > 2
    # Active means serving: the first fetch after it gets the poem, with no retry.
    assert fetch(systemd.machine, timeout=2) == POEM.read_bytes()


def test_stop_drains_and_ends_inactive_without_sigkill(systemd: Systemd) -> None:
    """`systemctl stop` during a slow poem: the poem ends whole, then inactive (dead)."""
    systemd.install_shipped()
    systemd.drop_in(
        SERVICE,
        "[Service]\nExecStart=\n"
        f"ExecStart=/usr/local/bin/tend --nodaemon --pidfile= poetry --port systemd:name=poetry "
        f"{SLOW}\n",
    )
    systemd.reload()
    systemd("start", SOCKET, SERVICE)
    client = systemd.machine.popen("get-poetry", "--timeout", "30", "10000")
    systemd.wait_for_journal("sending 2807 bytes of poetry")
    began = time.monotonic()
    systemd("stop", SERVICE)
    stopping = time.monotonic() - began
    poem, errors = client.communicate(timeout=30)
    assert client.returncode == 0, errors
    assert poem.encode() == POEM.read_bytes()
    assert stopping > 1, "the stop did not wait for the drain"
    shown = systemd.show(SERVICE, "ActiveState", "SubState", "Result")
    assert shown == {"ActiveState": "inactive", "SubState": "dead", "Result": "success"}
    journal = systemd.journal_text()
    assert "SIGKILL" not in journal
    assert "Killing process" not in journal
    assert "Server Shut Down." in journal


def test_a_killed_tend_is_restarted(systemd: Systemd) -> None:
    """`systemctl kill -s SIGKILL`: Restart=on-failure starts tend again, and it serves."""
    systemd.install_shipped()
    systemd.reload()
    systemd("start", SOCKET, SERVICE)
    first = systemd.main_pid()
    systemd("kill", "-s", "SIGKILL", SERVICE)
    wait_until(lambda: systemd.show(SERVICE, "NRestarts")["NRestarts"] == "1")
    wait_until(lambda: systemd.state() == "active/running")
    assert systemd.main_pid() not in (0, first)
    journal = systemd.journal_text()
    assert "status=9/KILL" in journal
    assert "Scheduled restart job" in journal
    assert fetch(systemd.machine) == POEM.read_bytes()


def test_systemctl_reload_loses_no_fetch(systemd: Systemd) -> None:
    """The shipped ExecReload= sends SIGHUP: under steady fetching, two reloads each serve a
    new generation in the same main process, and every fetch gets the whole poem."""
    systemd.install_shipped()
    systemd.reload()
    systemd("start", SOCKET, SERVICE)
    first = systemd.main_pid()
    size = len(POEM.read_bytes())
    load = systemd.machine.popen(PYTHON, CLIENTS, "load", "10000", "8", "8", str(size))
    wait_until(lambda: len(systemd.messages()) > 40)  # a steady stream of fetches
    systemd("reload", SERVICE)
    systemd.wait_for_journal("reloaded: generation 2")
    systemd("reload", SERVICE)
    systemd.wait_for_journal("reloaded: generation 3")
    output, errors = load.communicate(timeout=60)
    assert load.returncode == 0, errors
    result = json.loads(output)
    assert result["failures"] == []
    assert result["whole"] > 100
    assert systemd.main_pid() == first
    assert systemd.state() == "active/running"


def test_the_machine_has_systemd_as_pid_1(machine: Machine) -> None:
    """The judge is the real thing: PID 1 in the container is systemd 252 or newer."""
    assert machine.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
    version = machine.run("systemctl", "--version").stdout.split()[1]
    assert int(version) >= 252
