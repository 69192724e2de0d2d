"""The relay that tend socks and tend portforward share, in the test's own event loop.

A relay is served here by tend's own StreamServer with a small RelayProtocol that connects
every client to one peer, on real sockets on 127.0.0.1, under asyncio's loop and uvloop's.
The peers (`PeerServer`) are threads of the test process; the socks and portforward tests
use them too, with real clients run as programs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_until_async

import tend
from tend.builtins.common import warn_if_exposed
from tend.builtins.portforward import PortForwardMaker
from tend.builtins.relay import (
    RelayProtocol,
    RelayService,
    open_tcp,
)
from tend.builtins.socks import SocksMaker
from tend.endpoints import Listening

# -- peers, shared with the socks and portforward tests ----------------------------------------


class PeerServer:
    """A server in threads of the test process: *handler* gets each accepted connection.

    On TCP 127.0.0.1 with a port picked by the kernel, or on the UNIX socket *unix_path*.
    `connections` counts the connections accepted; `results` collects what handlers return.
    """

    def __init__(
        self, handler: Callable[[socket.socket], object], unix_path: Path | None = None
    ) -> None:
        self.handler = handler
        if unix_path is None:
            self.sock = socket.create_server(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(str(unix_path))
            self.sock.listen()
            self.port = 0
        self.connections = 0
        self.results: list[object] = []
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the test is over
                return
            with self._lock:
                self.connections += 1
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            try:
                result = self.handler(conn)
            except OSError as error:
                self.errors.append(error)
                return
            with self._lock:
                self.results.append(result)

    def close(self) -> None:
        # shutdown wakes the thread blocked in accept(); close alone would not.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._acceptor.join(10)
        for thread in self._threads:
            thread.join(10)

    def __enter__(self) -> PeerServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def answer_after_eof(conn: socket.socket) -> bytes:
    """Read to end-of-file, then answer with the count and digest of what came, and close.

    An answer at all proves the end-of-file went through whatever stands between.
    """
    received = read_to_eof(conn)
    conn.sendall(b"got %d bytes, sha256 %s\n" % (len(received), sha256(received).encode()))
    return received


def read_to_eof(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_answer(data: bytes) -> bytes:
    """What answer_after_eof answers to *data*."""
    return b"got %d bytes, sha256 %s\n" % (len(data), sha256(data).encode())


HTTP_BODY = b"hello through the relay\n" * 100


def answer_http(conn: socket.socket) -> bytes:
    """Answer one HTTP request with HTTP_BODY and close; return the request's head."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            break
        head += chunk
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(HTTP_BODY), HTTP_BODY)
    )
    return head


class Flood:
    """A handler that sends *total* bytes of a counted pattern until the peer stops reading.

    `stalled` is set once a send has waited *stall* seconds (the relay pushed back) or all
    was sent; `sent` counts the bytes the kernel took. `go_on` lets it send the rest.
    """

    def __init__(self, total: int, stall: float = 1.0) -> None:
        self.total = total
        self.stall = stall
        self.sent = 0
        self.stalled = threading.Event()
        self.go_on = threading.Event()

    def __call__(self, conn: socket.socket) -> int:
        chunk = pattern(PIECE)
        conn.settimeout(self.stall)
        while self.sent < self.total:
            try:
                self.sent += conn.send(chunk[: self.total - self.sent])
            except TimeoutError:
                self.stalled.set()
                self.go_on.wait(60)
                conn.settimeout(60)
        self.stalled.set()
        conn.shutdown(socket.SHUT_WR)
        read_to_eof(conn)
        return self.sent


def pattern(size: int, start: int = 0) -> bytes:
    """Bytes *start* to *start* + *size* of a stream whose byte i is i % 251, so that every
    byte can be checked for place; send it in pieces of PIECE bytes."""
    offset = start % 251
    return (_PERIOD * ((offset + size) // 251 + 1))[offset : offset + size]


_PERIOD = bytes(range(251))
PIECE = 251 * 256  # a whole number of periods, about 64 KiB


def rss_kib(pid: int) -> int:
    """The resident set size of process *pid*, in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def worker_of(pid: int) -> int:
    """The pid of the one worker the tend supervisor *pid* started (found in /proc)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    return int(entry.name)
    raise AssertionError(f"no worker under pid {pid}")


# -- the relay in the test's loop -------------------------------------------------------------


class ToPeer(RelayProtocol):
    """Relays every client to one port, as portforward does; remembers its instances."""

    made: list[ToPeer]

    def __init__(self, service: RelayService, port: int) -> None:
        super().__init__(service)
        self.port = port
        ToPeer.made.append(self)

    def accepted(self) -> None:
        self.connect(lambda: open_tcp("127.0.0.1", self.port))


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.contextmanager
def event_loop_of(kind: str) -> Iterator[asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


@contextlib.asynccontextmanager
async def relay_to(port: int, idle_timeout: float | None = None) -> AsyncIterator[int]:
    """A relay to *port* served in this loop; yields the port it listens on."""
    ToPeer.made = []
    service = RelayService(
        access=tend.AccessLog("test.relay"),
        max_connections=100,
        connect_timeout=10,
        idle_timeout=idle_timeout,
        exposure="",
    )
    service.listen_on(["tcp:0:interface=127.0.0.1"], lambda: ToPeer(service, port), "")
    service.privileged_start_service()
    await service.start_service()
    try:
        listener = next(iter(service))
        assert isinstance(listener, tend.StreamServer)
        assert listener.port is not None
        yield listener.port
    finally:
        await service.stop_service()


@contextlib.asynccontextmanager
async def peer_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A server in this loop that runs *handle* for each connection; yields its port.

    On exit it closes, resets the connections still open and waits for every handler.
    """
    handlers: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        writers.append(writer)
        try:
            await handle(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # Bound here, not by start_server: given a host, uvloop resolves it in libuv's thread
    # pool, whose threads outlive the test and take signals meant for the main thread.
    server = await asyncio.start_server(serve, sock=socket.create_server(("127.0.0.1", 0)))
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        if handlers:
            await asyncio.wait(handlers)
        await server.wait_closed()


def test_half_close_goes_through_both_ways(loop_kind: str) -> None:
    """The client's end-of-file reaches the upstream, whose answer still comes back, and
    then the upstream's end-of-file reaches the client: nothing is closed early."""

    async def main() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()  # to end-of-file
            writer.write(expected_answer(data))
            await writer.drain()

        async with peer_server(answer) as port, relay_to(port) as relay_port:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
            writer.write(b"x" * 100_000)
            writer.write_eof()
            assert await reader.read() == expected_answer(b"x" * 100_000)
            writer.close()
            await writer.wait_closed()

    with event_loop_of(loop_kind) as loop:
        loop.run_until_complete(main())


def test_upstream_eof_first_leaves_the_client_able_to_send(loop_kind: str) -> None:
    """An upstream that says its piece and half-closes still receives what the client sends
    after, and the relay ends once the client is done too."""

    async def main() -> None:
        received = asyncio.get_running_loop().create_future()

        async def greet_then_listen(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            writer.write(b"hello\n")
            writer.write_eof()
            received.set_result(await reader.read())

        async with peer_server(greet_then_listen) as port, relay_to(port) as relay_port:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
            assert await reader.read() == b"hello\n"  # the upstream's end-of-file came through
            writer.write(b"and after that, this")
            writer.write_eof()
            assert await received == b"and after that, this"
            writer.close()
            await writer.wait_closed()

    with event_loop_of(loop_kind) as loop:
        loop.run_until_complete(main())


def test_a_reset_is_passed_on_as_a_reset(loop_kind: str) -> None:
    """A client that resets its connection makes the relay reset the upstream's, so the
    upstream cannot take a cut stream for a whole one."""

    async def main() -> None:
        outcome = asyncio.get_running_loop().create_future()

        async def read_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                outcome.set_result(await reader.read())
            except ConnectionResetError as error:
                outcome.set_result(error)

        async with peer_server(read_all) as port, relay_to(port) as relay_port:
            _, writer = await asyncio.open_connection("127.0.0.1", relay_port)
            writer.write(b"part of a message")
            await writer.drain()
            await wait_until_async(lambda: ToPeer.made and ToPeer.made[0].relay is not None)
            tend.reset(writer.transport)
            assert isinstance(await outcome, ConnectionResetError)

    with event_loop_of(loop_kind) as loop:
        loop.run_until_complete(main())


def test_a_client_that_never_reads_holds_at_most_a_buffer(loop_kind: str) -> None:
    """With a client that reads nothing, the relay stops reading the upstream once the
    client's buffer is full: it holds at most a transport buffer, and the upstream's sends
    stop. Then the client reads, and every byte arrives, in order."""
    total = PIECE * 1024  # 63 MiB

    async def main() -> None:
        sent = 0
        stalled = asyncio.Event()
        release = asyncio.Event()

        async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal sent
            chunk = pattern(PIECE)
            while sent < total:
                writer.write(chunk)
                sent += len(chunk)
                try:
                    async with asyncio.timeout(0.5):
                        await writer.drain()
                except TimeoutError:
                    stalled.set()
                    await release.wait()
                    await writer.drain()
            writer.write_eof()
            await reader.read()

        async with peer_server(flood) as port, relay_to(port) as relay_port:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay_port, limit=1 << 16)
            # The test's own stream reads into a buffer, then stops: a client that never reads.
            await stalled.wait()
            relay = ToPeer.made[0].relay
            assert relay is not None
            transport = ToPeer.made[0].transport
            assert transport is not None
            assert sent < total // 2, "the upstream was never held back"
            assert transport.get_write_buffer_size() <= 1 << 20
            release.set()
            received = 0
            while chunk := await reader.read(1 << 20):
                assert chunk == pattern(len(chunk), received)
                received += len(chunk)
            assert received == total
            writer.close()
            await writer.wait_closed()

    with event_loop_of(loop_kind) as loop:
        loop.run_until_complete(main())


def test_idle_connection_is_reset_and_logged(
    loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A relayed connection on which nothing moves for the idle timeout is reset on both
    sides, and its access line says so."""

    async def main() -> None:
        upstream_saw = asyncio.get_running_loop().create_future()

        async def wait(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                upstream_saw.set_result(await reader.read())
            except ConnectionResetError as error:
                upstream_saw.set_result(error)

        async with peer_server(wait) as port, relay_to(port, idle_timeout=0.2) as relay_port:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
            writer.write(b"one thing, then nothing")
            with pytest.raises(ConnectionResetError):
                await reader.read()
            assert isinstance(await upstream_saw, ConnectionResetError)
            writer.close()
            await wait_until_async(lambda: "nothing moved for 0.2 s" in caplog.text)

    caplog.set_level("INFO", logger="test.relay")
    with event_loop_of(loop_kind) as loop:
        loop.run_until_complete(main())
    line = next(line for line in caplog.messages if "nothing moved" in line)
    assert "23 bytes up, 0 bytes down" in line


def test_cap_closes_a_connection_past_it(caplog: pytest.LogCaptureFixture) -> None:
    """Past the cap, a new client is closed at once, and the line says why."""

    async def main() -> None:
        service = RelayService(
            access=tend.AccessLog("test.relay"),
            max_connections=1,
            connect_timeout=10,
            idle_timeout=None,
            exposure="",
        )

        class Waiting(RelayProtocol):
            def handshake(self, data: bytes) -> None:
                pass

        service.listen_on(["tcp:0:interface=127.0.0.1"], lambda: Waiting(service), "")
        service.privileged_start_service()
        await service.start_service()
        listener = next(iter(service))
        assert isinstance(listener, tend.StreamServer)
        _, first = await asyncio.open_connection("127.0.0.1", listener.port)
        await wait_until_async(lambda: service.open_connections == 1)
        second_reader, second = await asyncio.open_connection("127.0.0.1", listener.port)
        assert await second_reader.read() == b""
        assert service.open_connections == 1
        for writer in (first, second):
            writer.close()
            await writer.wait_closed()
        await service.stop_service()

    caplog.set_level("INFO", logger="test.relay")
    asyncio.run(main())
    assert "refused: 1 connections are open already" in caplog.text


# -- options ----------------------------------------------------------------------------------


def test_a_repeated_option_adds_up() -> None:
    """--listen (and socks' --allow) may be given again; each adds to the last."""
    options = SocksMaker().parse_options(
        [
            *("--listen", "1080", "--listen", "unix:/run/socks.sock"),
            *("--allow", "10.0.0.0/8", "--allow", "[::1]:443"),
        ],
        "tend socks",
    )
    assert options["listen"] == ["1080", "unix:/run/socks.sock"]
    assert [str(rule.network) for rule in options["allow"]] == [  # type: ignore[attr-defined]
        "10.0.0.0/8",
        "::1/128",
    ]
    assert SocksMaker().parse_options([], "tend socks")["allow"] == []
    once = PortForwardMaker().parse_options(
        ["--listen", "1", "--connect", "localhost:80"], "tend portforward"
    )
    assert once["listen"] == ["1"]
    with pytest.raises(Exception, match="invalid endpoint"):
        PortForwardMaker().parse_options(
            ["--listen", "1 2", "--connect", "localhost:80"], "tend portforward"
        )


@pytest.mark.parametrize(
    ("interface", "warned"),
    [("127.0.0.1", False), ("::1", False), ("::ffff:127.0.0.1", False), ("0.0.0.0", True),
     ("::", True)],
)  # fmt: skip
def test_warn_if_exposed_judges_the_bound_address(
    interface: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Bound sockets on loopback (IPv4-mapped loopback too, as a dual-stack socket systemd
    passes may be) get no warning; every interface gets one line, on the logger given."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    with socket.socket(family) as sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((interface, 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = tend.TCPServer(port, asyncio.Protocol, interface=interface)
        server.adopt(Listening(server.endpoint, [[sock]]))  # as a passed socket is
        with caplog.at_level("WARNING"):
            warn_if_exposed(server, "anyone can", logging.getLogger("tend.builtins.web"))
    records = [(r.name, r.getMessage()) for r in caplog.records]
    shown = f"[{interface}]:{port}" if ":" in interface else f"{interface}:{port}"
    expected = f"listening on {shown}, which other hosts can reach: anyone can"
    assert records == ([("tend.builtins.web", expected)] if warned else [])
