"""A poetry server killed mid-poem cuts its clients off with a reset, never a clean short poem.

In the poetry protocol a clean end-of-file is the only sign that a poem is whole, and the
kernel closes a dead process's sockets with exactly that, a FIN, unless SO_LINGER 0 is
armed. These tests SIGKILL the worker process (the supervisor's child) of real `tend`
processes at several moments, and check what the client sees: a reset, or the whole poem.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import POEM, Tend, shim_proxy_plugin, wait_until

FOREGROUND = ["--nodaemon", "--pidfile", ""]
LOCAL = ["--port", "0", "--iface", "127.0.0.1"]
KIB = 1024
MIB = 1024 * KIB
LINE = b"Whoever hath her wish, thou hast thy Will,\n"


def big_poem(folder: Path, size: int) -> Path:
    """A poem of about *size* bytes, larger than one write of the fast server."""
    path = folder / f"big-{size}.txt"
    path.write_bytes(LINE * (size // len(LINE)))
    return path


def children(tend: Tend) -> list[int]:
    try:
        text = Path(f"/proc/{tend.pid}/task/{tend.pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(pid) for pid in text.split()]


def worker_of(tend: Tend) -> int:
    """The worker of a one-worker tend: its supervisor's only child."""

    def look() -> int | None:
        found = children(tend)
        return found[0] if len(found) == 1 else None

    pid = wait_until(look)
    assert isinstance(pid, int)
    return pid


def kill_worker(tend: Tend) -> None:
    """SIGKILL the worker of *tend* and wait until it has died (its supervisor restarts it)."""
    pid = worker_of(tend)
    pidfd = os.pidfd_open(pid)
    try:
        # Still the supervisor's child once the pidfd is open: the pid named no other process.
        assert pid in children(tend)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        wait_until(lambda: select.select([pidfd], [], [], 0)[0])
    finally:
        os.close(pidfd)


def connect(port: int, window: int | None = None) -> socket.socket:
    """A client connection; *window* shrinks its receive buffer, to stall the server."""
    sock = socket.socket()
    try:
        if window is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def read_at_least(sock: socket.socket, count: int) -> bytes:
    """Read until at least *count* bytes have arrived (failing on an early end)."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(64 * KIB)
        assert chunk, f"the stream ended after {len(data)} bytes"
        data += chunk
    return data


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Read until the stream ends: what arrived, and "eof" or "reset"."""
    data = b""
    try:
        while chunk := sock.recv(1024 * KIB):
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    return data, "eof"


def assert_reset_or_whole(data: bytes, ending: str, poem: bytes) -> None:
    """What a poetry client must see: a reset, or the whole poem and a clean end."""
    if ending == "eof":
        assert len(data) == len(poem), f"a clean end after {len(data)} of {len(poem)} bytes"
        assert data == poem
    else:
        assert ending == "reset"
        assert poem.startswith(data)


def sending_lines(tend: Tend) -> int:
    return len(re.findall(r"sending \d+ bytes of poetry to", tend.stdout))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("after", [100, 1400, 2700])
def test_a_slow_server_killed_mid_poem_resets_its_client(
    run_tend: Callable[..., Tend], loop: str, after: int
) -> None:
    """SIGKILL after the first piece, halfway, or one piece from the end: a reset."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    tend = run_tend(
        *FOREGROUND, "--loop", loop, "poetry", *LOCAL, "--chunk-size", "100", "--delay", "0.05"
    )
    port = tend.wait_for_port()
    with connect(port) as client:
        received = read_at_least(client, after)
        kill_worker(tend)
        rest, ending = read_to_end(client)
    assert_reset_or_whole(received + rest, ending, POEM.read_bytes())
    assert ending == "reset" or after == 2700


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("read_first", [0, 4 * MIB, 16 * MIB - 64 * KIB])
def test_a_fast_server_killed_while_a_client_does_not_read_resets_it(
    run_tend: Callable[..., Tend], tmp_path: Path, loop: str, read_first: int
) -> None:
    """A 16 MiB poem, a client that reads part of it (or none) and stops: a reset.

    The server holds the rest of the poem in pieces, or, near the end, the last of it in
    the transport's buffer after the close; a SIGKILL in either state must not look like
    the end of a poem.
    """
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    poem_path = big_poem(tmp_path, 16 * MIB)
    poem = poem_path.read_bytes()
    tend = run_tend(*FOREGROUND, "--loop", loop, "poetry", *LOCAL, "--poem", str(poem_path))
    port = tend.wait_for_port()
    with connect(port, window=4 * KIB) as client:
        received = read_at_least(client, read_first) if read_first else b""
        wait_until(lambda: sending_lines(tend) == 1)
        kill_worker(tend)
        rest, ending = read_to_end(client)
    assert_reset_or_whole(received + rest, ending, poem)
    if read_first < 8 * MIB:  # far more is left than the kernel's buffers can hold
        assert ending == "reset"


def start_proxy(
    run_tend: Callable[..., Tend], tmp_path: Path, upstream_port: int, loop: str, *extra: str
) -> Tend:
    shim_proxy_plugin(tmp_path)
    return run_tend(
        *FOREGROUND,
        "--loop",
        loop,
        "poetry-proxy",
        *LOCAL,
        "--server",
        f"127.0.0.1:{upstream_port}",
        *extra,
    )


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_proxy_killed_while_sending_a_large_poem_resets_its_client(
    run_tend: Callable[..., Tend], tmp_path: Path, loop: str
) -> None:
    """The proxy sends its cached 16 MiB poem to a client that does not read; SIGKILL: a reset.

    (Smaller poems may fit whole in the kernel's buffers, and then arrive whole.)
    """
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    poem_path = big_poem(tmp_path, 16 * MIB)
    poem = poem_path.read_bytes()
    upstream = run_tend(*FOREGROUND, "poetry", *LOCAL, "--poem", str(poem_path))
    proxy = start_proxy(
        run_tend, tmp_path, upstream.wait_for_port(), loop, "--max-poem-bytes", str(32 * MIB)
    )
    port = proxy.wait_for_port()
    with connect(port) as warm:  # fills the cache
        assert read_to_end(warm) == (poem, "eof")
    with connect(port, window=4 * KIB) as client:
        received = read_at_least(client, 1)
        wait_until(lambda: "serving cached poem to" in proxy.stdout)
        kill_worker(proxy)
        rest, ending = read_to_end(client)
    assert_reset_or_whole(received + rest, ending, poem)
    assert ending == "reset"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_proxy_killed_while_its_clients_wait_for_the_upstream_resets_them(
    run_tend: Callable[..., Tend], tmp_path: Path, loop: str
) -> None:
    """Clients waiting for a slow upstream fetch are reset when the proxy is killed."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    upstream = run_tend(*FOREGROUND, "poetry", *LOCAL, "--chunk-size", "100", "--delay", "0.5")
    proxy = start_proxy(run_tend, tmp_path, upstream.wait_for_port(), loop)
    port = proxy.wait_for_port()
    clients = [connect(port) for _ in range(3)]
    try:
        wait_until(lambda: proxy.stdout.count("waits for the poem already on its way") == 2)
        kill_worker(proxy)
        outcomes = [read_to_end(client) for client in clients]
    finally:
        for client in clients:
            client.close()
    assert outcomes == [(b"", "reset")] * 3


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_proxy_does_not_cache_a_poem_cut_by_a_killed_upstream(
    run_tend: Callable[..., Tend], tmp_path: Path, loop: str
) -> None:
    """The upstream's worker is killed mid-poem: the proxy's client is reset, nothing is
    cached, and the next client gets the whole poem from the restarted upstream."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    upstream = run_tend(
        *FOREGROUND, "--loop", loop, "poetry", *LOCAL, "--chunk-size", "100", "--delay", "0.05"
    )
    proxy = start_proxy(run_tend, tmp_path, upstream.wait_for_port(), loop)
    port = proxy.wait_for_port()
    with connect(port) as client:
        wait_until(lambda: sending_lines(upstream) == 1)
        wait_until(lambda: "proxying poem from" in proxy.stdout)
        kill_worker(upstream)
        assert read_to_end(client) == (b"", "reset")
    wait_until(lambda: "cannot fetch poem from" in proxy.stdout)
    assert "fetched" not in proxy.stdout

    def whole() -> bool:
        """Fetch again: reset during the proxy's back-off, then the whole poem."""
        try:
            with connect(port) as client:
                outcome = read_to_end(client)
        except ConnectionResetError:  # reset before connect() returned
            return False
        assert outcome in ((b"", "reset"), (POEM.read_bytes(), "eof"))
        return outcome[1] == "eof"

    wait_until(whole)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_client_reset_before_it_is_accepted_costs_one_line(
    run_tend: Callable[..., Tend], tmp_path: Path, loop: str
) -> None:
    """A client connects and resets while the worker is stopped (SIGSTOP): one line.

    Once the worker runs again it accepts the dead connection, and its first write of a
    16 MiB poem fails; the rest must not then be written, piece by piece, to a closed
    transport (asyncio logged each such write).
    """
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    poem_path = big_poem(tmp_path, 16 * MIB)
    tend = run_tend(*FOREGROUND, "--loop", loop, "poetry", *LOCAL, "--poem", str(poem_path))
    port = tend.wait_for_port()
    pid = worker_of(tend)
    pidfd = os.pidfd_open(pid)
    try:
        assert pid in children(tend)
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
        try:
            with connect(port) as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            signal.pidfd_send_signal(pidfd, signal.SIGCONT)
    finally:
        os.close(pidfd)
    wait_until(lambda: "closed after" in tend.stdout)
    assert tend.stop() == 0
    # Its address, if the loop took it from accept(); else it has none left to give.
    assert re.search(
        r"connection to (127\.0\.0\.1:\d+|a client already gone) closed after \d+ of",
        tend.stdout,
    )
    assert "socket.send() raised exception" not in tend.stdout
    assert "Traceback" not in tend.stdout
