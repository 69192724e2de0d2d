"""journald: tend's lines in `journalctl -u`, each at its priority; JSON lines whole."""

from __future__ import annotations

import json

from .conftest import SERVICE, SOCKET, Systemd, fetch

# Logs one line at each level once started, one with a traceback, and one long line.
LOUD = """
import logging

import tend
from tend.poetry import DEFAULT_POEM
from tend.poetry.server import PoetryFactory, PoetryService

log = logging.getLogger("loud")


class Loud(tend.Service):
    async def start_service(self):
        await super().start_service()
        log.debug("a debug line")
        log.info("an info line")
        log.warning("a warning line")
        log.error("an error line")
        log.critical("a critical line")
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("a line with its traceback")
        log.info("a long line: %s", "x" * 20000)


application = tend.Application("loud")
poetry = PoetryService(DEFAULT_POEM)
poetry.set_service_parent(application)
tend.StreamServer("systemd:name=poetry", PoetryFactory(poetry)).set_service_parent(application)
Loud().set_service_parent(application)
"""

APP = "ExecStart=/usr/local/bin/tend --nodaemon --pidfile= {options} -y /etc/tend/loud.py\n"


def run_loud(systemd: Systemd, options: str = "") -> None:
    systemd.install_shipped()
    systemd.write("/etc/tend/loud.py", LOUD)
    systemd.drop_in(SERVICE, "[Service]\nExecStart=\n" + APP.format(options=options))
    systemd.reload()
    systemd("start", SOCKET, SERVICE)
    systemd.wait_for_journal("a long line")


def test_each_line_is_filed_at_its_priority(systemd: Systemd) -> None:
    """info at 6, warning at 4, error at 3, critical at 2; debug is below the log's level."""
    run_loud(systemd)
    tends = [entry for entry in systemd.journal() if entry.get("SYSLOG_IDENTIFIER") == "tend"]
    priorities = {entry["MESSAGE"]: entry["PRIORITY"] for entry in tends}
    assert priorities["[loud] an info line"] == "6"
    assert priorities["[loud] a warning line"] == "4"
    assert priorities["[loud] an error line"] == "3"
    assert priorities["[loud] a critical line"] == "2"
    assert "[loud] a debug line" not in priorities
    assert priorities["[-] Log opened."] == "6"
    # The traceback's lines are filed with the line they belong to, at its priority.
    traceback = [m for m in priorities if "ZeroDivisionError" in m]
    assert traceback
    assert all(priorities[line] == "3" for line in traceback)
    # No line shows the <N> prefix: journald took it as the priority.
    assert not [m for m in priorities if m.startswith("<")]
    # `journalctl -p warning` as the README shows it: warnings and worse only.
    shown = systemd.machine.run(
        "journalctl", "-u", SERVICE, "-p", "warning", "-o", "cat", "--no-pager"
    ).stdout
    assert "[loud] a warning line" in shown
    assert "[loud] an info line" not in shown


def test_json_lines_arrive_whole(systemd: Systemd) -> None:
    """--log-format json: every line tend writes is one JSON object in one journal entry."""
    run_loud(systemd, "--log-format json")
    fetch(systemd.machine)
    tends = [entry for entry in systemd.journal() if entry.get("SYSLOG_IDENTIFIER") == "tend"]
    records = [json.loads(entry["MESSAGE"]) for entry in tends]
    # No priority prefix on a JSON line: journald files each at info, as the README says.
    assert {entry["PRIORITY"] for entry in tends} == {"6"}
    by_message = {record["message"]: record for record in records}
    assert by_message["an error line"]["level"] == "error"
    assert "ZeroDivisionError" in by_message["a line with its traceback"]["exception"]
    assert by_message["a long line: " + "x" * 20000]["logger"] == "loud"
    assert any(record["message"].startswith("sending 2807 bytes") for record in records)


def test_a_failed_start_is_an_error_in_the_journal(systemd: Systemd) -> None:
    """A start that fails: systemd says failed, and tend's one line is filed at err."""
    systemd.install_shipped()
    systemd.drop_in(
        SERVICE,
        "[Service]\nRestart=no\nExecStart=\nExecStart=/usr/local/bin/tend --nodaemon "
        "--pidfile= poetry --port systemd:name=poetry --poem /etc/tend/missing.txt\n",
    )
    systemd.reload()
    systemd("start", SOCKET)
    output = systemd("start", SERVICE, check=False)
    assert "failed" in output
    line = "cannot read poem file '/etc/tend/missing.txt': No such file or directory"
    errors = [e for e in systemd.journal() if line in e["MESSAGE"] and e["PRIORITY"] == "3"]
    assert errors, systemd.journal_text()


def test_a_failed_start_is_reported_once(systemd: Systemd) -> None:
    """tend's one line about a failed start appears once in the journal, not twice."""
    systemd.install_shipped()
    systemd.drop_in(
        SERVICE,
        "[Service]\nRestart=no\nExecStart=\nExecStart=/usr/local/bin/tend --nodaemon "
        "--pidfile= poetry --port systemd:name=poetry --poem /etc/tend/missing.txt\n",
    )
    systemd.reload()
    systemd("start", SOCKET)
    systemd("start", SERVICE, check=False)
    systemd.wait_for_journal("Failed with result")
    line = "cannot read poem file '/etc/tend/missing.txt'"
    assert len([m for m in systemd.messages() if line in m]) == 1, systemd.journal_text()
