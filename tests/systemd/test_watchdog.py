"""The watchdog: tend pings systemd while its loop runs, and a stuck loop is restarted."""

from __future__ import annotations

import time

from .conftest import SERVICE, SOCKET, Systemd, wait_until

# Serves the poem, then blocks its event loop 3 s after starting, for good.
BLOCKER = """
import asyncio
import time

import tend
from tend.poetry import DEFAULT_POEM
from tend.poetry.server import PoetryFactory, PoetryService


class Blocker(tend.Service):
    async def start_service(self):
        await super().start_service()
        asyncio.get_running_loop().call_later(3, time.sleep, 3600)


application = tend.Application("blocker")
poetry = PoetryService(DEFAULT_POEM)
poetry.set_service_parent(application)
tend.StreamServer("systemd:name=poetry", PoetryFactory(poetry)).set_service_parent(application)
Blocker().set_service_parent(application)
"""


def test_a_watchdog_of_2_s_keeps_a_healthy_tend_running(systemd: Systemd) -> None:
    """WatchdogSec=2: the same tend is still running 10 s later, never restarted."""
    systemd.install_shipped()
    systemd.drop_in(SERVICE, "[Service]\nWatchdogSec=2\n")
    systemd.reload()
    systemd("start", SOCKET, SERVICE)
    pid = systemd.main_pid()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        shown = systemd.show(SERVICE, "MainPID", "NRestarts", "ActiveState")
        assert shown == {"MainPID": str(pid), "NRestarts": "0", "ActiveState": "active"}
        time.sleep(0.5)
    assert "atchdog" not in systemd.journal_text()


def test_a_blocked_event_loop_is_killed_and_restarted(systemd: Systemd) -> None:
    """An app whose loop blocks stops pinging: systemd says watchdog timeout, restarts it."""
    systemd.install_shipped()
    systemd.write("/etc/tend/blocker.py", BLOCKER)
    systemd.drop_in(
        SERVICE,
        "[Service]\nWatchdogSec=2\nExecStart=\n"
        "ExecStart=/usr/local/bin/tend --nodaemon --pidfile= -y /etc/tend/blocker.py\n",
    )
    systemd.reload()
    systemd("start", SOCKET, SERVICE)
    first = systemd.main_pid()
    systemd.wait_for_journal(r"(?i)watchdog timeout", timeout=30)
    wait_until(lambda: int(systemd.show(SERVICE, "NRestarts")["NRestarts"]) >= 1, 30)
    wait_until(lambda: systemd.main_pid() not in (0, first), 30)
