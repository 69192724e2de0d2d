"""tend portforward, run for real: curl and netcat-openbsd's nc through it, half-close,
backpressure both ways measured on the worker's memory, a UNIX upstream, and the PROXY
protocol header as the upstream receives it.

The upstreams are peers in the test process (see test_builtin_relay). twistd's
portforward drops half-close: `nc -N` gets 0 bytes back through it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Tend, assert_usage_error, run_once, wait_until
from test_builtin_relay import (
    HTTP_BODY,
    PIECE,
    Flood,
    PeerServer,
    answer_after_eof,
    answer_http,
    expected_answer,
    pattern,
    read_to_eof,
    rss_kib,
    worker_of,
)

FOREGROUND = ("--nodaemon", "--pidfile", "")
LOCAL = ("--listen", "tcp:0:interface=127.0.0.1")

# What the relay may hold for a connection that does not move, with room for the
# interpreter's own noise: the relay itself holds one transport buffer (64 KiB) plus a read.
RSS_GROWTH_LIMIT_KIB = 32 * 1024
# Far more than the kernel's socket buffers on both sides can hold, so that a relay that
# buffered without bound would show it.
FLOOD_BYTES = PIECE * 2048  # 126 MiB


def needs(program: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        shutil.which(program) is None,
        reason=f"needs {program} (make test installs it, as root)",
    )


StartForward = Callable[..., tuple[Tend, int]]


@pytest.fixture
def start_forward(run_tend: Callable[..., Tend]) -> StartForward:
    """Start `tend portforward` on a free port with these options; return it and its port."""

    def start(*options: str) -> tuple[Tend, int]:
        forward = run_tend(*FOREGROUND, "portforward", *LOCAL, *options)
        return forward, forward.wait_for_port()

    return start


@pytest.fixture
def eof_peer() -> Iterator[PeerServer]:
    with PeerServer(answer_after_eof) as peer:
        yield peer


@needs("curl")
def test_curl_through_it(start_forward: StartForward) -> None:
    """curl gets the upstream's page; the access line counts the bytes each way."""
    with PeerServer(answer_http) as peer:
        forward, port = start_forward("--connect", f"127.0.0.1:{peer.port}")
        result = subprocess.run(
            ["curl", "--silent", "--show-error", "--max-time", "20", f"http://127.0.0.1:{port}/"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == HTTP_BODY
    line = rf"127\.0\.0\.1:\d+ to 127\.0\.0\.1:{peer.port}: \d+ bytes up, (\d+) bytes down"
    match = wait_until(lambda: re.search(line, forward.stdout))
    assert int(match.group(1)) > len(HTTP_BODY)


@needs("nc")
def test_nc_half_close_gets_the_answer(start_forward: StartForward, eof_peer: PeerServer) -> None:
    """`nc -N` sends a megabyte and half-closes; the upstream's answer, sent only after that
    end-of-file, comes back whole (twistd's portforward gives nc nothing)."""
    _, port = start_forward("--connect", f"localhost:{eof_peer.port}")
    data = os.urandom(1 << 20)
    result = subprocess.run(
        ["nc", "-N", "127.0.0.1", str(port)],
        input=data,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == expected_answer(data)
    assert eof_peer.results == [data]


@needs("nc")
def test_a_unix_upstream(start_forward: StartForward, tmp_path: Path) -> None:
    """--connect unix:PATH relays to a UNIX socket, half-close included."""
    with PeerServer(answer_after_eof, unix_path=tmp_path / "upstream.sock") as peer:
        _, port = start_forward("--connect", f"unix:{tmp_path / 'upstream.sock'}")
        result = subprocess.run(
            ["nc", "-N", "127.0.0.1", str(port)],
            input=b"to a unix socket",
            capture_output=True,
            timeout=60,
            check=True,
        )
        assert result.stdout == expected_answer(b"to a unix socket")
        assert peer.connections == 1


# -- backpressure --------------------------------------------------------------------------------


def test_a_client_that_never_reads_holds_the_upstream_back(start_forward: StartForward) -> None:
    """An upstream sends 126 MiB to a client that reads nothing: the upstream's sends stall
    while the worker's memory stays within a few MiB; then the client reads, and every byte
    arrives, in order."""
    flood = Flood(FLOOD_BYTES)
    with PeerServer(flood) as peer:
        forward, port = start_forward("--connect", f"127.0.0.1:{peer.port}")
        worker = worker_of(forward.pid)
        before = rss_kib(worker)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
            assert flood.stalled.wait(60)
            grown = rss_kib(worker) - before
            assert flood.sent < FLOOD_BYTES // 2, "the upstream was never held back"
            assert grown < RSS_GROWTH_LIMIT_KIB, f"the worker grew by {grown} KiB"
            flood.go_on.set()
            received = 0
            while chunk := client.recv(1 << 20):
                assert chunk == pattern(len(chunk), received)
                received += len(chunk)
            assert received == FLOOD_BYTES
            client.shutdown(socket.SHUT_WR)


class SlowReader:
    """An upstream that reads nothing until `go_on` is set, then reads to end-of-file and
    answers with the count and digest."""

    def __init__(self) -> None:
        self.go_on = threading.Event()

    def __call__(self, conn: socket.socket) -> int:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.go_on.wait(60)
        received = read_to_eof(conn)
        conn.sendall(expected_answer(received))
        return len(received)


def test_a_slow_upstream_holds_the_client_back(start_forward: StartForward) -> None:
    """A client sends to an upstream that reads nothing: the client's sends stall while the
    worker's memory stays within a few MiB; then the upstream reads, and gets every byte."""
    upstream = SlowReader()
    with PeerServer(upstream) as peer:
        forward, port = start_forward("--connect", f"127.0.0.1:{peer.port}")
        worker = worker_of(forward.pid)
        before = rss_kib(worker)
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=1) as client:
            while sent < FLOOD_BYTES:
                try:
                    sent += client.send(pattern(PIECE, sent))
                except TimeoutError:
                    break  # a send waited a second: held back
            assert sent < FLOOD_BYTES // 2, "the client was never held back"
            grown = rss_kib(worker) - before
            assert grown < RSS_GROWTH_LIMIT_KIB, f"the worker grew by {grown} KiB"
            upstream.go_on.set()
            client.settimeout(60)
            while sent < FLOOD_BYTES:
                sent += client.send(pattern(min(PIECE, FLOOD_BYTES - sent), sent))
            client.shutdown(socket.SHUT_WR)
            answer = read_to_eof(client)
    digest = hashlib.sha256()
    for _ in range(FLOOD_BYTES // PIECE):
        digest.update(pattern(PIECE))  # the stream is the pattern, whole pieces of it
    assert answer == b"got %d bytes, sha256 %s\n" % (FLOOD_BYTES, digest.hexdigest().encode())


# -- the PROXY protocol ------------------------------------------------------------------------


def record_then_answer(conn: socket.socket) -> bytes:
    """Read to end-of-file, answer "ok", return everything that came (the header first)."""
    received = read_to_eof(conn)
    conn.sendall(b"ok\n")
    return received


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_header_names_the_client(start_forward: StartForward, version: str) -> None:
    """With --proxy-protocol the upstream first receives the header naming the client's
    address and port and the address and port it connected to, then the client's bytes."""
    with PeerServer(record_then_answer) as peer:
        _, port = start_forward("--connect", f"127.0.0.1:{peer.port}", "--proxy-protocol", version)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client_port = client.getsockname()[1]
            client.sendall(b"payload")
            client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == b"ok\n"
    (received,) = peer.results
    if version == "v1":
        header = f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {port}\r\n".encode()
    else:
        loopback = socket.inet_aton("127.0.0.1")
        header = (
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
            + loopback
            + loopback
            + client_port.to_bytes(2, "big")
            + port.to_bytes(2, "big")
        )
    assert received == header + b"payload"


@pytest.mark.parametrize(
    ("version", "header"),
    [("v1", b"PROXY UNKNOWN\r\n"), ("v2", b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")],
)
def test_proxy_protocol_for_a_unix_client(
    run_tend: Callable[..., Tend], tmp_path: Path, version: str, header: bytes
) -> None:
    """A client on a UNIX socket has no address to pass on: UNKNOWN (v1) or LOCAL (v2)."""
    with PeerServer(record_then_answer) as peer:
        path = tmp_path / "in.sock"
        forward = run_tend(
            *FOREGROUND,
            "portforward",
            *("--listen", f"unix:{path}", "--connect", f"127.0.0.1:{peer.port}"),
            *("--proxy-protocol", version),
        )
        forward.wait_for_output("starting on")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(path))
            client.sendall(b"payload")
            client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == b"ok\n"
    assert peer.results == [header + b"payload"]


# -- an upstream that is not there -------------------------------------------------------------


def test_a_refused_upstream_resets_the_client(start_forward: StartForward) -> None:
    """An upstream that refuses makes the client's connection end with a reset (never a
    clean end that reads as an empty answer), and the line says why."""
    closed = socket.create_server(("127.0.0.1", 0))
    nothing_there = closed.getsockname()[1]
    closed.close()
    forward, port = start_forward("--connect", f"127.0.0.1:{nothing_there}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"anyone?")
        with pytest.raises(ConnectionResetError):
            client.recv(4096)
    wait_until(lambda: "cannot connect: Connection refused" in forward.stdout)


def test_an_upstream_that_does_not_answer_times_out(start_forward: StartForward) -> None:
    """An upstream whose accept queue is full never answers the connection: after
    --connect-timeout the client is reset."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        with socket.create_connection(full.getsockname(), timeout=10):  # fills the queue
            target = f"127.0.0.1:{full.getsockname()[1]}"
            forward, port = start_forward("--connect", target, "--connect-timeout", "0.3")
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            with client, pytest.raises(ConnectionResetError):
                client.recv(4096)
    wait_until(lambda: "cannot connect: timed out" in forward.stdout)


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--connect", "localhost:1"), "the following arguments are required: --listen"),
        (("--listen", "1"), "the following arguments are required: --connect"),
        (("--listen", "tcp:x", "--connect", "localhost:1"), "argument --listen: invalid endpoint"),
        (("--listen", "1", "--connect", "localhost:0"), "the port must be a number from 1"),
        (("--listen", "1", "--connect", "unix:"), "argument --connect: invalid upstream 'unix:'"),
        (("--listen", "1", "--connect", "::1:80"), "invalid upstream '::1:80': expected HOST:PORT"),
        (("--listen", "1", "--connect", "tcp:port=1:x=2"), "invalid upstream 'tcp:port=1:x=2'"),
        (
            ("--listen", "1", "--connect", "1", "--proxy-protocol", "v3"),
            "argument --proxy-protocol: expected one of v1, v2, not 'v3'",
        ),
        (
            ("--listen", "1", "--connect", "1", "--connect-timeout", "0"),
            "argument --connect-timeout: invalid duration '0'",
        ),
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    tmp_path: Path, options: tuple[str, ...], message: str
) -> None:
    """Each bad or missing option is one line, then the help hint; exit 2."""
    result = run_once(*FOREGROUND, "portforward", *options, cwd=tmp_path)
    assert result.returncode == 2
    assert_usage_error(result.stderr, "portforward", message)


@pytest.mark.parametrize(
    ("listen", "connect"),
    [
        ("18090", "localhost:18090"),
        ("tcp:18090:interface=127.0.0.1", "127.0.0.1:18090"),
        ("18090", "127.1:18090"),
        ("18090", "0:18090"),
        ("18090", "2130706433:18090"),
        ("18090", "[::ffff:127.0.0.1]:18090"),
        ("18090", "LOCALHOST:18090"),
    ],
)
def test_forwarding_to_itself_is_refused_at_start(
    tmp_path: Path, listen: str, connect: str
) -> None:
    """--connect naming the listener itself would loop every connection back: one line, exit 1."""
    result = run_once(
        *FOREGROUND, "portforward", "--listen", listen, "--connect", connect, cwd=tmp_path
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "that is where it listens, so every connection would loop back to it" in lines[0]


def test_a_stop_lets_relayed_connections_finish(
    start_forward: StartForward, eof_peer: PeerServer
) -> None:
    """On SIGTERM it stops accepting but a relayed connection goes on to its end (tend's
    drain); then it exits 0."""
    forward, port = start_forward("--connect", f"127.0.0.1:{eof_peer.port}")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(b"before the stop, ")
        wait_until(lambda: eof_peer.connections == 1)
        forward.process.send_signal(signal.SIGTERM)
        forward.wait_for_output(r"TCP Port \d+ Closed")
        client.sendall(b"and after it")
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == expected_answer(b"before the stop, and after it")
    assert forward.wait() == 0
