"""Ports below 1024 without running as root: DynamicUser=, User=, and tend's own -u."""

from __future__ import annotations

import pytest

from .conftest import (
    POEM,
    SERVICE,
    SOCKET,
    UNITS,
    Systemd,
    binding_below_1024,
    fetch,
    unit_without_socket,
)
from .machine import Machine


def uid_of(machine: Machine, pid: int) -> int:
    status = machine.run("cat", f"/proc/{pid}/status").stdout
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(line.split()[1])


def workers_of(machine: Machine, pid: int) -> list[int]:
    children = machine.run("cat", f"/proc/{pid}/task/{pid}/children").stdout
    return [int(child) for child in children.split()]


def test_a_dynamic_user_serves_port_79_from_the_socket_unit(systemd: Systemd) -> None:
    """The shipped units with ListenStream=79: tend, without privileges, serves it."""
    systemd.install_shipped()
    systemd.drop_in(SOCKET, "[Socket]\nListenStream=\nListenStream=79\n")
    systemd.reload()
    systemd("start", SOCKET)
    assert fetch(systemd.machine, 79) == POEM.read_bytes()
    pid = systemd.main_pid()
    assert uid_of(systemd.machine, pid) != 0
    assert all(uid_of(systemd.machine, w) != 0 for w in workers_of(systemd.machine, pid))


@pytest.mark.parametrize("user", ["DynamicUser=yes", "User=nobody"])
def test_a_user_binds_port_79_itself_with_the_capability(systemd: Systemd, user: str) -> None:
    """Without the socket unit, as the README says: the capability lets tend bind 79."""
    service = binding_below_1024(unit_without_socket((UNITS / SERVICE).read_text(), "tcp:79"))
    service = service.replace("DynamicUser=yes\n", user + "\n")
    assert "CAP_NET_BIND_SERVICE" in service
    systemd.install(SERVICE, service)
    systemd.reload()
    output = systemd("start", SERVICE, check=False)
    assert systemd.state() == "active/running", output + systemd.journal_text()
    assert fetch(systemd.machine, 79) == POEM.read_bytes()
    pid = systemd.main_pid()
    assert uid_of(systemd.machine, pid) != 0


def test_tend_dash_u_binds_as_root_and_serves_as_nobody(systemd: Systemd) -> None:
    """`tend -u nobody` in a root service: the supervisor binds 79, the worker is nobody."""
    systemd.install(SERVICE, root_unit_for_dash_u((UNITS / SERVICE).read_text()))
    systemd.reload()
    output = systemd("start", SERVICE, check=False)
    assert systemd.state() == "active/running", output + systemd.journal_text()
    assert fetch(systemd.machine, 79) == POEM.read_bytes()
    pid = systemd.main_pid()
    (worker,) = workers_of(systemd.machine, pid)
    assert uid_of(systemd.machine, pid) == 0
    assert uid_of(systemd.machine, worker) == 65534


def root_unit_for_dash_u(service: str) -> str:
    """The shipped unit changed as the README's "Letting tend drop privileges" says.

    It runs as root, without a private user namespace, and keeps the capabilities the
    supervisor needs: binding the port, switching the worker's user and signalling it.
    """
    service = unit_without_socket(service, "tcp:79")
    service = service.replace("--nodaemon --pidfile=", "--nodaemon --pidfile= -u nobody")
    kept = []
    for line in service.splitlines():
        if line.startswith(("DynamicUser=", "PrivateUsers=", "CapabilityBoundingSet=")):
            continue
        if line == "SystemCallFilter=~@privileged @resources":
            line = "SystemCallFilter=~@resources"
        kept.append(line)
    text = "\n".join(kept) + "\n"
    return text.replace(
        "[Service]\n",
        "[Service]\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID CAP_KILL\n",
        1,
    )
