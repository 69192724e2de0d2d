"""A tend out of file descriptors: a short log, clients waiting in the backlog, a quick recovery.

Each test runs a real `tend` under ``prlimit --nofile=64`` and opens 500 connections at
once that never read a 16 MiB poem, so every connection the server accepts stays open.
By default the server stops accepting at ``--max-connections`` (derived from the limit)
and never runs out; with ``--max-connections 1000`` it does run out, and must say so at
most once a second, not once per failed accept(). Either way, once the clients are gone
a fetch succeeds within 2 s.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TEND, Spawned, wait_until

FOREGROUND = ["--nodaemon", "--pidfile", ""]
LOCAL = ["--port", "0", "--iface", "127.0.0.1"]
DESCRIPTORS = 64
CLIENTS = 500
LINE = b"Little Lamb, who made thee? Dost thou know who made thee?\n"

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Callable[..., Spawned]]:
    """Start `tend` with at most DESCRIPTORS open files; kill what is left at the end."""
    started: list[Spawned] = []

    def start(*args: str) -> Spawned:
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        command = ["prlimit", f"--nofile={DESCRIPTORS}", *TEND, *args]
        started.append(Spawned(command, tmp_path, environment))
        return started[-1]

    yield start
    with contextlib.ExitStack() as stack:
        for handle in started:
            stack.callback(handle.kill)


def worker_of(tend: Spawned) -> int:
    def look() -> int | None:
        with contextlib.suppress(FileNotFoundError):
            found = Path(f"/proc/{tend.pid}/task/{tend.pid}/children").read_text().split()
            if len(found) == 1:
                return int(found[0])
        return None

    pid = wait_until(look)
    assert isinstance(pid, int)
    return pid


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect_many(port: int, count: int) -> list[socket.socket]:
    """*count* connections at once (non-blocking connects), with small windows, never read."""
    clients = []
    try:
        for _ in range(count):
            sock = socket.socket()
            clients.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
    except BaseException:
        for sock in clients:
            sock.close()
        raise
    return clients


def whole_fetch(port: int, size: int) -> bool:
    """True if a fetch gets *size* bytes and a clean end; False on any failure."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            received = 0
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
    except OSError:
        return False
    return received == size


def sending_lines(tend: Spawned) -> int:
    return len(re.findall(r"sending \d+ bytes of poetry to", tend.stdout))


def other_lines(tend: Spawned) -> list[str]:
    """The log lines that are not the poetry server's per-connection lines."""
    return [line for line in tend.stdout.splitlines() if "[tend.poetry.server]" not in line]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("limit", ["default", "1000"])
def test_a_server_out_of_descriptors_logs_little_and_recovers_within_2_s(
    limited: Callable[..., Spawned], tmp_path: Path, loop: str, limit: str
) -> None:
    """500 held connections under a limit of 64 files; then a fetch within 2 s."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    poem = tmp_path / "big.txt"
    poem.write_bytes(LINE * (16 * 1024 * 1024 // len(LINE)))
    cap = [] if limit == "default" else ["--max-connections", limit]
    tend = limited(*FOREGROUND, "--loop", loop, *cap, "poetry", *LOCAL, "--poem", str(poem))
    port = int(tend.wait_for_output(r"starting on (\d+)").group(1))
    worker = worker_of(tend)
    clients = connect_many(port, CLIENTS)
    try:
        if limit == "default":
            # The server stops at its limit, below the descriptors it has.
            found = tend.wait_for_output(r"reached the limit of (\d+) connections")
            wait_until(lambda: sending_lines(tend) >= int(found.group(1)))
            assert open_descriptors(worker) < DESCRIPTORS
        elif loop == "asyncio":
            # It runs out, and says so once, then a second time a second later, with a count.
            tend.wait_for_output(r"cannot accept connections.*\(\d+ times in the last 1 s\)")
        else:
            # uvloop (libuv) answers EMFILE by resetting the waiting clients, and says nothing.
            wait_until(lambda: open_descriptors(worker) >= DESCRIPTORS - 2)
    finally:
        for sock in clients:
            sock.close()
    wait_until(lambda: whole_fetch(port, poem.stat().st_size), timeout=2)
    others = other_lines(tend)
    assert len(others) < 20, "\n".join(others)
    assert "Traceback" not in tend.stdout
    assert tend.stderr == ""
    assert tend.stop() == 0


def test_max_connections_reaches_the_worker(
    limited: Callable[..., Spawned], tmp_path: Path
) -> None:
    """--max-connections 2: a third client that waits is not served until one leaves."""
    poem = tmp_path / "big.txt"
    poem.write_bytes(LINE * (16 * 1024 * 1024 // len(LINE)))
    tend = limited(*FOREGROUND, "--max-connections", "2", "poetry", *LOCAL, "--poem", str(poem))
    port = int(tend.wait_for_output(r"starting on (\d+)").group(1))
    clients = connect_many(port, 3)
    try:
        tend.wait_for_output(r"reached the limit of 2 connections \(--max-connections\)")
        wait_until(lambda: sending_lines(tend) == 2)
        clients.pop(0).close()
        wait_until(lambda: sending_lines(tend) == 3)
    finally:
        for sock in clients:
            sock.close()
    assert tend.stop() == 0


@pytest.mark.parametrize("value", ["-1", "many", "1.5"])
def test_a_bad_max_connections_is_a_usage_error(
    limited: Callable[..., Spawned], value: str
) -> None:
    tend = limited("--max-connections", value, "poetry")
    assert tend.wait() == 2
    assert f"argument --max-connections: invalid count {value!r}" in tend.stderr
