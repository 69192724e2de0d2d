"""Socket activation with the shipped units: systemd holds the port, tend comes on demand."""

from __future__ import annotations

import json

from .conftest import CLIENTS, POEM, PYTHON, SERVICE, SOCKET, Systemd, wait_until


def test_the_socket_holds_the_port_and_the_first_client_starts_tend(systemd: Systemd) -> None:
    """A client that connected before tend existed gets the whole poem."""
    systemd.install_shipped()
    systemd.reload()
    systemd("enable", "--now", SOCKET)
    assert systemd.state(SOCKET) == "active/listening"
    assert "[::]:10000 (Stream)" in systemd("status", SOCKET)
    assert systemd.state() == "inactive/dead"

    client = systemd.machine.popen(PYTHON, CLIENTS, "early", "10000")
    assert client.stdout is not None
    connected = float(client.stdout.readline().split()[1])
    output, errors = client.communicate(timeout=30)
    assert client.returncode == 0, errors
    assert output.split() == ["received", str(len(POEM.read_bytes()))]

    assert systemd.state() == "active/running"
    # The service's process was made after the client had its connection.
    started = systemd.show(SERVICE, "ExecMainStartTimestampMonotonic")
    assert int(started["ExecMainStartTimestampMonotonic"]) / 1e6 > connected


# Not strict: the race is real but not met on every run (about one run in three here).
def test_a_restart_loses_no_client(systemd: Systemd) -> None:
    """Clients fetching all through two `systemctl restart`s all get whole poems."""
    systemd.install_shipped()
    systemd.reload()
    systemd("start", SOCKET, SERVICE)
    size = len(POEM.read_bytes())
    load = systemd.machine.popen(PYTHON, CLIENTS, "load", "10000", "8", "8", str(size))
    first = systemd.main_pid()
    wait_until(lambda: len(systemd.messages()) > 40)  # a steady stream of fetches
    systemd("restart", SERVICE)
    second = systemd.main_pid()
    systemd("restart", SERVICE)
    third = systemd.main_pid()
    output, errors = load.communicate(timeout=60)
    assert load.returncode == 0, errors
    result = json.loads(output)
    assert result["failures"] == []
    assert result["whole"] > 100
    assert len({first, second, third}) == 3
    assert "SIGKILL" not in systemd.journal_text()
