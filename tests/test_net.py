"""Tests for tend.net: listening services that serve, drain and reset real connections."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import wait_until_async

from tend.endpoints import ListenError, TCPEndpoint
from tend.net import (
    SPARE_DESCRIPTORS,
    AcceptErrorLog,
    ConnectionLimit,
    StreamServer,
    TCPServer,
    UNIXServer,
    arm_reset,
    close_cleanly,
    default_max_connections,
    limit_connections,
    reset,
    stopping_by,
)
from tend.service import MultiService

LOCAL = "tcp:0:interface=127.0.0.1"

Serve = Callable[[StreamServer], Awaitable[StreamServer]]


class Greeter(asyncio.Protocol):
    """Says hello and closes cleanly."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"hello\n")
        transport.close()


class Holder(asyncio.Protocol):
    """Holds the connection open until the client sends ``bye``, then answers ``done``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = b""
        self.lost = False
        self.lost_with: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(b"bye") and self.transport is not None:
            self.transport.write(b"done")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_with = exc


class Echo(asyncio.Protocol):
    """Echoes what arrives; answers the client's end-of-file with ``eof`` and closes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.transport.write(b"eof")
        self.transport.close()
        return True


class BufferedEcho(asyncio.BufferedProtocol):
    """Echoes through a buffer it lends to the transport; closes on end-of-file."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray(256)
        self.buffers_lent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        self.buffers_lent += 1
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None
        self.transport.write(bytes(self.buffer[:nbytes]))

    def eof_received(self) -> bool:
        return False


class Resetter(asyncio.Protocol):
    """Cuts the connection with tend.reset as soon as anything arrives."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reset(self.transport)


class Flooder(asyncio.Protocol):
    """Writes until told to pause; once resumed, writes ``END`` and closes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.paused = 0
        self.resumed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        chunk = b"x" * 65536
        for _ in range(1024):
            if self.paused:
                break
            transport.write(chunk)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1
        assert self.transport is not None
        self.transport.write(b"END")
        self.transport.close()


def recording(
    cls: Callable[[], asyncio.BaseProtocol],
) -> tuple[list[Any], Callable[[], asyncio.BaseProtocol]]:
    """A factory making *cls* instances, and the list each one is appended to."""
    made: list[Any] = []

    def make() -> asyncio.BaseProtocol:
        protocol = cls()
        made.append(protocol)
        return protocol

    return made, make


async def connect(port: int | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to *port* (a server's bound port) on 127.0.0.1."""
    assert port is not None, "the server is not bound"
    return await asyncio.open_connection("127.0.0.1", port)


async def close(writer: asyncio.StreamWriter) -> None:
    """Close a client stream, whatever state the server left it in."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def refused(port: int | None) -> bool:
    """True if a connection to *port* on 127.0.0.1 is refused."""
    try:
        _, writer = await connect(port)
    except ConnectionRefusedError:
        return True
    await close(writer)
    return False


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for UNIX sockets (their paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tend-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a server as the runner does; every server still running is stopped at the end."""
    started: list[StreamServer] = []

    async def serve_(server: StreamServer) -> StreamServer:
        started.append(server)
        server.privileged_start_service()
        await server.start_service()
        return server

    yield serve_
    for server in started:
        if server.running:
            server.grace_period = 0
            await server.stop_service()
        server.stop_listening()


async def test_serves_a_protocol_on_tcp(serve: Serve) -> None:
    """A StreamServer on tcp:0 of 127.0.0.1 serves its protocol to a real client."""
    server = await serve(StreamServer(LOCAL, Greeter))

    reader, writer = await connect(server.port)
    assert await reader.read() == b"hello\n"
    await close(writer)


async def test_tcp_server_serves_like_twistds(serve: Serve) -> None:
    """TCPServer(port, factory, interface=) serves just as the equivalent StreamServer."""
    server = await serve(TCPServer(0, Greeter, interface="127.0.0.1"))

    assert server.endpoint == TCPEndpoint(0, "127.0.0.1")
    reader, writer = await connect(server.port)
    assert await reader.read() == b"hello\n"
    await close(writer)


async def test_reports_addresses_and_port_once_bound() -> None:
    """`addresses` and `port` are empty before the bind and name the real port after it."""
    server = StreamServer(LOCAL, Greeter)
    assert server.addresses == []
    assert server.port is None

    server.privileged_start_service()
    try:
        assert server.port is not None
        assert server.port != 0
        assert server.addresses == [f"127.0.0.1:{server.port}"]
    finally:
        server.stop_listening()
    assert server.addresses == []


async def test_start_binds_when_privileged_start_was_skipped(serve: Serve) -> None:
    """start_service alone binds the sockets when no privileged start came first."""
    server = StreamServer(LOCAL, Greeter)
    await server.start_service()
    try:
        assert server.running
        reader, writer = await connect(server.port)
        assert await reader.read() == b"hello\n"
        await close(writer)
    finally:
        await server.stop_service()


async def test_busy_port_fails_the_privileged_start() -> None:
    """Binding a port another server holds fails in the privileged phase with a ListenError."""
    first = StreamServer(LOCAL, Greeter)
    first.privileged_start_service()
    try:
        second = StreamServer(f"tcp:{first.port}:interface=127.0.0.1", Greeter)
        with pytest.raises(ListenError, match="address already in use"):
            second.privileged_start_service()
        assert second.addresses == []
    finally:
        first.stop_listening()


async def test_logs_starting_and_closed_lines(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """A server logs `<Factory> starting on PORT` on start and `(TCP Port N Closed)` on stop."""
    caplog.set_level(logging.INFO, logger="tend")
    server = await serve(StreamServer(LOCAL, Greeter))
    port = server.port

    await server.stop_service()

    messages = [r.getMessage() for r in caplog.records if r.name == "tend"]
    assert messages == [f"Greeter starting on {port}", f"(TCP Port {port} Closed)"]


async def test_stop_refuses_new_connections(serve: Serve) -> None:
    """Once stopped, the server's port refuses connections."""
    server = await serve(StreamServer(LOCAL, Greeter))
    port = server.port

    await server.stop_service()

    assert not server.running
    assert server.addresses == []
    assert await refused(port)


async def test_stop_returns_at_once_when_no_connection_is_open(
    serve: Serve,
) -> None:
    """A stop with nothing to drain does not wait for the grace period."""
    server = await serve(StreamServer(LOCAL, Greeter))
    server.grace_period = 60

    async with asyncio.timeout(5):
        await server.stop_service()


async def test_stop_lets_an_open_connection_finish(serve: Serve) -> None:
    """A stop closes the listener at once but lets an open connection finish in the grace."""
    made, factory = recording(Holder)
    server = await serve(StreamServer(LOCAL, factory))
    server.grace_period = 30
    port = server.port
    reader, writer = await connect(port)
    await wait_until_async(lambda: server.connection_count == 1)

    stopping = asyncio.create_task(server.stop_service())
    await wait_until_async(lambda: not server.addresses)
    assert await refused(port)
    assert not stopping.done()

    writer.write(b"bye")
    assert await reader.read() == b"done"
    await close(writer)
    async with asyncio.timeout(5):
        await stopping
    assert server.aborted_connections == 0
    assert server.connection_count == 0
    assert made[0].lost_with is None


async def test_drain_deadline_resets_a_connection_still_open(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection open when the grace period ends is reset, and counted as aborted."""
    made, factory = recording(Holder)
    server = await serve(StreamServer(LOCAL, factory))
    server.grace_period = 0.2
    port = server.port
    reader, writer = await connect(port)
    await wait_until_async(lambda: server.connection_count == 1)

    async with asyncio.timeout(10):
        await server.stop_service()

    with pytest.raises(ConnectionResetError):
        await reader.read()
    await close(writer)
    assert server.aborted_connections == 1
    assert server.connection_count == 0
    assert made[0].lost, "the protocol should learn of the reset before stop returns"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert (
        warnings[0]
        .getMessage()
        .startswith(f"aborted 1 connection(s) on TCP Port {port} still open after ")
    )


async def test_stop_deadline_wins_over_grace_period(
    serve: Serve,
) -> None:
    """The deadline of the stop in progress ends the drain even when the grace period is long."""
    _, factory = recording(Holder)
    server = await serve(StreamServer(LOCAL, factory))
    server.grace_period = 600
    readers = []
    writers = []
    for _ in range(2):
        reader, writer = await connect(server.port)
        readers.append(reader)
        writers.append(writer)
    await wait_until_async(lambda: server.connection_count == 2)

    with stopping_by(asyncio.get_running_loop().time() + 0.2):
        async with asyncio.timeout(10):
            await server.stop_service()

    for reader, writer in zip(readers, writers, strict=True):
        with pytest.raises(ConnectionResetError):
            await reader.read()
        await close(writer)
    assert server.aborted_connections == 2


async def test_reset_cuts_a_connection_with_rst(serve: Serve) -> None:
    """tend.reset ends a TCP connection so the client sees a reset, not end-of-file."""
    server = await serve(StreamServer(LOCAL, Resetter))
    reader, writer = await connect(server.port)

    writer.write(b"anything")
    with pytest.raises(ConnectionResetError):
        await reader.read()
    await close(writer)


async def test_counts_open_connections(serve: Serve) -> None:
    """connection_count follows connections as they open and close."""
    server = await serve(StreamServer(LOCAL, Holder))
    clients = [await connect(server.port) for _ in range(3)]
    await wait_until_async(lambda: server.connection_count == 3)

    for reader, writer in clients:
        writer.write(b"bye")
        assert await reader.read() == b"done"
        await close(writer)

    await wait_until_async(lambda: server.connection_count == 0)


async def test_protocol_receives_end_of_file(serve: Serve) -> None:
    """A client's end-of-file reaches the protocol, which may still answer before closing."""
    server = await serve(StreamServer(LOCAL, Echo))
    reader, writer = await connect(server.port)

    writer.write(b"ping")
    writer.write_eof()

    assert await reader.read() == b"pingeof"
    await close(writer)


async def test_serves_a_buffered_protocol(serve: Serve) -> None:
    """A BufferedProtocol is served through its own buffers."""
    made, factory = recording(BufferedEcho)
    server = await serve(StreamServer(LOCAL, factory))
    reader, writer = await connect(server.port)

    writer.write(b"through a lent buffer")
    writer.write_eof()

    assert await reader.read() == b"through a lent buffer"
    await close(writer)
    assert made[0].buffers_lent >= 1


async def test_protocol_is_told_to_pause_and_resume_writing(
    serve: Serve,
) -> None:
    """A protocol writing faster than the client reads is paused, then resumed."""
    made, factory = recording(Flooder)
    server = await serve(StreamServer(LOCAL, factory))
    reader, writer = await connect(server.port)
    await wait_until_async(lambda: made and made[0].paused)

    data = await reader.read()

    assert data.endswith(b"END")
    assert made[0].paused == 1
    assert made[0].resumed == 1
    await close(writer)


async def test_stopped_server_can_start_again(serve: Serve) -> None:
    """A server that was stopped binds and serves again when started again."""
    server = await serve(StreamServer(LOCAL, Greeter))
    await server.stop_service()

    server.privileged_start_service()
    await server.start_service()

    reader, writer = await connect(server.port)
    assert await reader.read() == b"hello\n"
    await close(writer)


async def test_unix_server_serves_and_removes_its_socket_on_stop(
    serve: Serve, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A UNIXServer serves on its socket file, logs its path, and removes the file on stop."""
    caplog.set_level(logging.INFO, logger="tend")
    path = short_dir / "greeter.sock"
    server = await serve(UNIXServer(str(path), Greeter))
    assert server.addresses == [str(path)]
    assert server.port is None

    reader, writer = await asyncio.open_unix_connection(str(path))
    assert await reader.read() == b"hello\n"
    await close(writer)
    await server.stop_service()

    assert not path.exists()
    messages = [r.getMessage() for r in caplog.records if r.name == "tend"]
    assert messages == [f"Greeter starting on {path}", f"(UNIX Port {path} Closed)"]


async def test_a_unix_path_with_a_control_character_is_logged_escaped(
    serve: Serve, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An escape character in a socket's path is shown as \\x1b in the log: one line, no
    terminal control sequence."""
    caplog.set_level(logging.INFO, logger="tend")
    folder = short_dir / "a\x1b[2Jb"
    folder.mkdir()
    server = await serve(UNIXServer(str(folder / "g.sock"), Greeter))
    await server.stop_service()
    shown = f"{short_dir}/a\\x1b[2Jb/g.sock"
    messages = [r.getMessage() for r in caplog.records if r.name == "tend"]
    assert messages == [f"Greeter starting on {shown}", f"(UNIX Port {shown} Closed)"]


async def test_unix_server_applies_its_mode(serve: Serve, short_dir: Path) -> None:
    """UNIXServer(path, factory, mode=) gives the socket file that mode."""
    path = short_dir / "greeter.sock"
    await serve(UNIXServer(str(path), Greeter, mode=0o600))

    assert path.stat().st_mode & 0o777 == 0o600


async def test_unix_server_drains_by_abort(serve: Serve, short_dir: Path) -> None:
    """A UNIX connection still open at the drain deadline is aborted and counted."""
    path = short_dir / "holder.sock"
    made, factory = recording(Holder)
    server = await serve(UNIXServer(str(path), factory))
    server.grace_period = 0.2
    reader, writer = await asyncio.open_unix_connection(str(path))
    await wait_until_async(lambda: server.connection_count == 1)

    async with asyncio.timeout(10):
        await server.stop_service()

    assert server.aborted_connections == 1
    assert made[0].lost
    with contextlib.suppress(ConnectionResetError):
        await reader.read()
    await close(writer)


async def test_tls_key_is_read_in_the_privileged_start_before_binding(tmp_path: Path) -> None:
    """A TLS server reads its certificate when it binds; a bad one fails before any bind."""
    missing = tmp_path / "missing.pem"
    server = StreamServer(f"tls:0:interface=127.0.0.1:certKey={missing}", Greeter)

    with pytest.raises(ListenError) as caught:
        server.privileged_start_service()

    assert (
        str(caught.value) == f"cannot read TLS certificate '{missing}': No such file or directory"
    )
    assert server.port is None
    assert server.addresses == []


# -- arm_reset and close_cleanly: a cut stream ends in a reset, a whole one cleanly -----------

BLOB = b"So, so, break off this last lamenting kiss,\n" * (4 * 1024 * 1024 // 44)


class Armed(asyncio.Protocol):
    """Arms the reset, writes *payload*, then ends as *ending* says: clean, plain or abort."""

    def __init__(self, payload: bytes, ending: str) -> None:
        self.payload = payload
        self.ending = ending
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement WriteTransport without subclassing it.
        transport = cast(asyncio.WriteTransport, transport)
        self.transport = transport
        arm_reset(transport)
        transport.write(self.payload)
        if self.ending == "clean":
            close_cleanly(transport)
        elif self.ending == "plain":
            transport.close()


def on_loop(loop: str, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run *scenario* on a fresh event loop of the kind *loop* names, for at most 30 s.

    (pytest-timeout's alarm cannot interrupt uvloop waiting in C, so the bound is here.)
    """
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(scenario(), 30))


async def read_to_end(client: socket.socket) -> tuple[bytes, str]:
    """Read *client* until it ends; return what arrived and "eof" or "reset"."""
    loop = asyncio.get_running_loop()
    chunks = []
    try:
        while chunk := await loop.sock_recv(client, 1 << 20):
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    return b"".join(chunks), "eof"


@contextlib.asynccontextmanager
async def armed_connection(
    payload: bytes, ending: str
) -> AsyncIterator[tuple[Armed, socket.socket]]:
    """A server whose protocol is Armed, and a client connected to it that reads nothing yet."""
    made: list[Armed] = []

    def make() -> Armed:
        made.append(Armed(payload, ending))
        return made[-1]

    server = StreamServer(LOCAL, make)
    server.privileged_start_service()
    await server.start_service()
    client = socket.socket()
    try:
        # A small window, so that most of a large payload stays in the server process.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", server.port or 0))
        await wait_until_async(lambda: made and made[0].transport)
        yield made[0], client
    finally:
        client.close()
        server.grace_period = 0
        await server.stop_service()


def linger_of(transport: asyncio.BaseTransport) -> tuple[int, int]:
    sock = transport.get_extra_info("socket")
    on, seconds_ = struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
    return on, seconds_


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_close_cleanly_ends_a_short_stream_with_end_of_file(loop: str) -> None:
    """Armed, written and closed cleanly at once: the client gets it all, then end-of-file."""

    async def scenario() -> None:
        async with armed_connection(b"a whole poem\n", "clean") as (_, client):
            assert await read_to_end(client) == (b"a whole poem\n", "eof")

    on_loop(loop, scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_close_cleanly_disarms_only_once_the_process_holds_nothing_more(loop: str) -> None:
    """While written bytes wait in the process, the reset stays armed; then a clean end.

    4 MiB to a client that has not read yet cannot all be in the kernel, so close_cleanly
    has to wait for the transport's buffer to empty before it turns SO_LINGER off.
    """

    async def scenario() -> None:
        async with armed_connection(BLOB, "clean") as (armed, client):
            assert armed.transport is not None
            assert armed.transport.get_write_buffer_size() > 0
            assert linger_of(armed.transport) == (1, 0)
            assert not armed.transport.is_closing()
            data, ending = await read_to_end(client)
            assert (len(data), ending) == (len(BLOB), "eof")
            assert data == BLOB

    on_loop(loop, scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_armed_connection_aborted_while_flushing_is_reset(loop: str) -> None:
    """An abort after close_cleanly, with bytes still in the process, is a reset."""

    async def scenario() -> None:
        async with armed_connection(BLOB, "clean") as (armed, client):
            assert armed.transport is not None
            armed.transport.abort()  # type: ignore[attr-defined]
            data, ending = await read_to_end(client)
            assert ending == "reset"
            assert len(data) < len(BLOB)

    on_loop(loop, scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_plain_close_of_an_armed_connection_is_a_reset(loop: str) -> None:
    """Once armed, only close_cleanly ends cleanly: transport.close() resets."""

    async def scenario() -> None:
        async with armed_connection(BLOB, "plain") as (_, client):
            data, ending = await read_to_end(client)
            assert ending == "reset"
            assert len(data) < len(BLOB)

    on_loop(loop, scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_client_end_of_file_while_flushing_still_gets_the_whole_stream(loop: str) -> None:
    """A client that half-closes during the flush still reads everything, then end-of-file.

    The protocol's eof_received returns None, so the transport closes itself; the reset
    is disarmed all the same once the buffer is empty.
    """

    async def scenario() -> None:
        async with armed_connection(BLOB, "clean") as (_, client):
            client.shutdown(socket.SHUT_WR)
            data, ending = await read_to_end(client)
            assert (len(data), ending) == (len(BLOB), "eof")

    on_loop(loop, scenario)


class Plain(asyncio.Protocol):
    """Writes BLOB and closes with transport.close(), knowing nothing of arming."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        cast(asyncio.WriteTransport, transport).write(BLOB)
        transport.close()


async def test_an_armed_server_accepts_every_connection_armed(serve: Serve) -> None:
    """StreamServer(armed=True): a connection is armed before its protocol does anything."""
    made, factory = recording(Plain)
    server = await serve(StreamServer(LOCAL, factory, armed=True))
    reader, writer = await connect(server.port)
    await wait_until_async(lambda: made)
    with pytest.raises(ConnectionResetError):  # the plain close of an armed connection
        await reader.read()
    await close(writer)


async def test_a_server_not_armed_disarms_a_listening_socket_armed_before(serve: Serve) -> None:
    """A socket passed on (by systemd, say) armed by an earlier run is disarmed on start."""
    server = StreamServer(LOCAL, Plain)
    listening = server.listen()
    for sock in listening.sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await serve(server)
    reader, writer = await connect(server.port)
    assert await reader.read() == BLOB
    await close(writer)


# -- the connection limit: at most so many at once, the rest waiting in the backlog -----------


async def hello_and_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Finish a Holder connection: say bye, expect done."""
    writer.write(b"bye")
    assert await reader.read() == b"done"
    await close(writer)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_server_at_its_limit_leaves_new_clients_in_the_backlog(loop: str) -> None:
    """With a limit of 2, a third client waits, connected, until one of the two leaves."""

    async def scenario() -> None:
        made, factory = recording(Holder)
        server = StreamServer(LOCAL, factory)
        server.connection_limit = ConnectionLimit(2)
        server.privileged_start_service()
        await server.start_service()
        try:
            clients = []
            for count in (1, 2, 3):
                clients.append(await connect(server.port))
                await wait_until_async(lambda count=count: len(made) >= min(count, 2))
            # Two more turns of the loop for the third: still not accepted.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert (len(made), server.connection_count) == (2, 2)
            await hello_and_bye(*clients[0])
            await wait_until_async(lambda: len(made) == 3)
            await hello_and_bye(*clients[1])
            await hello_and_bye(*clients[2])
            # Below the limit again, the server accepts as before.
            await hello_and_bye(*await connect(server.port))
            assert len(made) == 4
        finally:
            server.grace_period = 0
            await server.stop_service()

    on_loop(loop, scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_one_limit_is_shared_by_the_listeners_it_is_given(loop: str) -> None:
    """Two servers share a limit of 2: one connection each, and a third waits for either."""

    async def scenario() -> None:
        made_a, factory_a = recording(Holder)
        made_b, factory_b = recording(Holder)
        first = StreamServer(LOCAL, factory_a)
        second = StreamServer(LOCAL, factory_b)
        tree = MultiService()
        first.set_service_parent(tree)
        second.set_service_parent(tree)
        limit = limit_connections(tree, 2)
        assert (first.connection_limit, second.connection_limit) == (limit, limit)
        tree.privileged_start_service()
        await tree.start_service()
        try:
            on_first = await connect(first.port)
            await wait_until_async(lambda: made_a)
            on_second = await connect(second.port)
            await wait_until_async(lambda: made_b)
            waiting = await connect(first.port)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert (len(made_a), len(made_b), limit.open) == (1, 1, 2)
            await hello_and_bye(*on_second)
            await wait_until_async(lambda: len(made_a) == 2)
            await hello_and_bye(*on_first)
            await hello_and_bye(*waiting)
        finally:
            first.grace_period = second.grace_period = 0
            await tree.stop_service()

    on_loop(loop, scenario)


def test_the_default_limit_leaves_descriptors_spare() -> None:
    """The default limit is the open-file limit less what is open and SPARE_DESCRIPTORS."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) - 1
    assert default_max_connections() == max(1, soft - in_use - SPARE_DESCRIPTORS)


def test_a_limit_below_1_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionLimit(0)


async def test_accept_errors_are_logged_at_most_once_an_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hundred EMFILE reports: one line at once, one line with the count an interval on."""
    loop = asyncio.get_running_loop()
    handler = AcceptErrorLog(interval=0.1)
    error = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        caplog.set_level(logging.ERROR, logger="tend")
        for _ in range(100):
            handler(
                loop,
                {
                    "message": "socket.accept() out of system resource",
                    "exception": error,
                    "socket": sock,
                },
            )
        lines = [record.getMessage() for record in caplog.records]
        assert lines == [
            f"cannot accept connections on 127.0.0.1:{port}: Too many open files; "
            "raise the open-file limit (ulimit -n) or lower --max-connections"
        ]
        await wait_until_async(lambda: len(caplog.records) == 2)
    assert (
        caplog.records[1]
        .getMessage()
        .endswith("lower --max-connections (99 times in the last 0.1 s)")
    )


async def test_other_loop_errors_go_to_the_default_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception that is not an accept() out of descriptors is logged as asyncio would."""
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.ERROR, logger="asyncio")
    AcceptErrorLog()(loop, {"message": "Exception in callback", "exception": ValueError("x")})
    assert [(record.name, record.getMessage()) for record in caplog.records] == [
        ("asyncio", "Exception in callback")
    ]
