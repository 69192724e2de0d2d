"""Listening services: StreamServer, TCPServer, UNIXServer.

A listening service binds in the privileged phase (so a low port works before tend drops
root), serves once started, and on stop closes its listeners, lets open connections
finish until a deadline, then resets the rest. It owns its connections' lifetimes and
nothing else; protocols are plain asyncio protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any, cast

from tend.endpoints import Endpoint, Listening, TCPEndpoint, UNIXEndpoint, parse_endpoint
from tend.service import Service, walk

log = logging.getLogger("tend")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

# How long connections in flight may run on after a stop, unless the stop in progress
# gives its own deadline (see stopping_by).
DEFAULT_GRACE_PERIOD = 10.0

# SO_LINGER on with a timeout of 0: closing the socket, or the death of its process, sends RST.
_LINGER_RESET = struct.pack("ii", 1, 0)
# SO_LINGER off, the default: closing sends FIN after whatever the kernel still holds.
_LINGER_OFF = struct.pack("ii", 0, 0)


def _set_linger(transport: asyncio.BaseTransport, linger: bytes) -> None:
    """Set SO_LINGER on *transport*'s socket (on a UNIX socket it changes nothing).

    On every poetry connection, twice: so no family check (its enum costs more than the
    call), and a bare try rather than contextlib.suppress, which builds an object per call.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:  # noqa: SIM105 -- on the hot path, as the docstring says
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:  # the socket is already closed: nothing left to arm or disarm
            pass


def reset(transport: asyncio.BaseTransport) -> None:
    """Abort *transport* with a TCP reset, so the peer can tell a cut stream from a whole one.

    In stream protocols such as poetry a clean end-of-file means "that was all", so a
    connection cut short must not end with one: SO_LINGER 0 makes close send RST.
    """
    _set_linger(transport, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


def arm_reset(transport: asyncio.BaseTransport) -> None:
    """Make *transport* end in a TCP reset however it ends, until `close_cleanly` ends it.

    Call it when the connection is made, before the first write, in a protocol whose clean
    end-of-file means "that was all" (poetry). From then on a connection that is aborted,
    closed by asyncio on an error, or left open when the process dies (SIGKILL, the OOM
    killer, a crash: the kernel then closes its sockets) ends in RST, so the peer never
    mistakes a cut stream for a whole one. SO_LINGER 0 does it, at the cost of one system
    call here and one in `close_cleanly`; on a StreamServer made with ``armed=True`` the
    connection was born armed, and this costs nothing. A UNIX socket cannot be reset: a
    cut stream there ends like a whole one.
    """
    protocol = transport.get_protocol()
    if isinstance(protocol, _Tracking) and protocol._server.armed:
        return
    _set_linger(transport, _LINGER_RESET)


def close_cleanly(transport: asyncio.BaseTransport) -> None:
    """Close *transport* with a clean end-of-file once everything written has left the
    process (twistd: loseConnection), disarming `arm_reset` only then.

    ``transport.close()`` may still hold unsent data in the process; were the process to
    die during that flush with the reset disarmed, the peer would see a clean end after
    part of the stream. So while data remains, the transport stands in a protocol of its
    own until the buffer is empty, forwarding what arrives to the protocol it replaced;
    only then is SO_LINGER turned off and the connection closed. A connection reset or
    aborted meanwhile ends as it would have.
    """
    if transport.is_closing() or isinstance(transport.get_protocol(), _Flushing):
        return
    writer = cast(asyncio.WriteTransport, transport)
    if not writer.get_write_buffer_size():
        _set_linger(transport, _LINGER_OFF)
        transport.close()
        return
    flushing: _Flushing
    protocol = transport.get_protocol()
    if isinstance(protocol, asyncio.BufferedProtocol):
        flushing = _FlushingBuffered(writer, protocol)
    else:
        flushing = _FlushingProtocol(writer, protocol)
    transport.set_protocol(flushing)
    # Low water 0: resume_writing comes once the buffer is empty, not merely below a mark.
    writer.set_write_buffer_limits(high=0, low=0)


class _Flushing:
    """Stands in for a protocol while its last bytes leave the process; then closes cleanly."""

    def __init__(self, transport: asyncio.WriteTransport, protocol: Any) -> None:
        self._transport = transport
        self._protocol = protocol
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Never called: the transport was made for the protocol this one stands in for."""

    def pause_writing(self) -> None:
        """The limits were set to zero: this is the wait for an empty buffer beginning."""

    def resume_writing(self) -> None:
        # The buffer is empty: everything written is in the kernel, so a death from here on
        # would still deliver the whole stream before the FIN.
        if self._done:
            return
        self._done = True
        transport = self._transport
        _set_linger(transport, _LINGER_OFF)
        transport.set_protocol(self._protocol)
        # Not close() here: asyncio would then end the connection twice, once for the
        # close and once for the write that emptied the buffer and called us.
        if not transport.is_closing():
            asyncio.get_running_loop().call_soon(transport.close)

    def eof_received(self) -> bool | None:
        result: bool | None = self._protocol.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self._protocol.connection_lost(exc)


class _FlushingProtocol(_Flushing, asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        self._protocol.data_received(data)


class _FlushingBuffered(_Flushing, asyncio.BufferedProtocol):
    def get_buffer(self, sizehint: int) -> Any:
        return self._protocol.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._protocol.buffer_updated(nbytes)


def factory_name(protocol_factory: object) -> str:
    """The name twistd would show for a factory: its class or function name."""
    name = getattr(protocol_factory, "__qualname__", None)
    return name if isinstance(name, str) else type(protocol_factory).__qualname__


class StreamServer(Service):
    """Serve *protocol_factory* on a stream endpoint (twistd: strports.service).

    *endpoint* is a description such as ``tcp:10000:interface=127.0.0.1``,
    ``unix:/run/poetry.sock``, ``tls:8443:certKey=server.pem`` or ``systemd:index=0``,
    or an already parsed endpoint.

    With *armed*, every connection is accepted armed as `arm_reset` arms one (the kernel
    copies SO_LINGER from the listening socket to each connection it accepts): it saves a
    system call per connection, and leaves no moment between accept and arming at all.
    Its protocols must then end each connection with `close_cleanly` (or `reset`): a
    plain ``transport.close()`` resets.
    """

    def __init__(
        self,
        endpoint: str | Endpoint,
        protocol_factory: ProtocolFactory,
        *,
        default_interface: str = "",
        armed: bool = False,
    ) -> None:
        super().__init__()
        self.armed = armed
        self.endpoint = (
            parse_endpoint(endpoint, default_interface) if isinstance(endpoint, str) else endpoint
        )
        self.protocol_factory = protocol_factory
        self.grace_period = DEFAULT_GRACE_PERIOD
        self._listening: Listening | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.BaseTransport] = set()
        self._idle: asyncio.Event | None = None
        self._aborted = 0
        self._label = str(self.endpoint)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.endpoint} {factory_name(self.protocol_factory)}>"

    @property
    def listening(self) -> Listening | None:
        """The sockets this server listens on, once bound."""
        return self._listening

    @property
    def addresses(self) -> list[str]:
        """The addresses actually bound, e.g. ``127.0.0.1:43123`` after asking for port 0."""
        return [] if self._listening is None else self._listening.addresses

    @property
    def port(self) -> int | None:
        """The TCP port actually bound, once bound."""
        return None if self._listening is None else self._listening.port

    @property
    def connection_count(self) -> int:
        """How many connections are open right now."""
        return len(self._connections)

    @property
    def aborted_connections(self) -> int:
        """How many connections this server has reset because a stop could not wait."""
        return self._aborted

    def listen(self, copies: int = 1) -> Listening:
        """Bind the endpoint now, in *copies* copies (one per worker), unless already bound.

        `privileged_start_service` calls it with one copy; a supervisor running N
        workers calls it first with N.
        """
        if self._listening is None or self._listening.closed:
            self._listening = self.endpoint.listen(copies)
            self._label = self._listening.label
        return self._listening

    def privileged_start_service(self) -> None:
        """Bind the listening sockets and read TLS keys, as the starting user."""
        self.listen()
        super().privileged_start_service()

    async def start_service(self) -> None:
        """Start accepting connections on the sockets bound earlier."""
        listening = self.listen()
        loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        log.info("%s starting on %s", factory_name(self.protocol_factory), listening.where)
        try:
            for sock in listening.sockets:
                # Set either way: a socket systemd passes keeps what an earlier run set.
                linger = _LINGER_RESET if self.armed else _LINGER_OFF
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                # asyncio calls listen() again with this, and accepts up to this many per wakeup.
                server = await loop.create_server(
                    self._make_protocol, sock=sock, backlog=self.endpoint.backlog, ssl=listening.tls
                )
                self._servers.append(server)
        except BaseException:
            self._close()
            raise
        await super().start_service()

    def _make_protocol(self) -> asyncio.BaseProtocol:
        protocol = self.protocol_factory()
        if isinstance(protocol, asyncio.BufferedProtocol):
            return _TrackedBufferedProtocol(self, protocol)
        return _TrackedProtocol(self, protocol)

    def _connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connections.add(transport)
        if self._idle is not None:
            self._idle.clear()

    def _connection_lost(self, transport: asyncio.BaseTransport) -> None:
        self._connections.discard(transport)
        if not self._connections and self._idle is not None:
            self._idle.set()

    def stop_listening(self) -> None:
        """Stop accepting new connections at once (twistd's "Closed" line); those open go on."""
        if self._close():
            log.info("(%s Closed)", self._label)

    def _close(self) -> bool:
        """Close the listeners; True if any were open."""
        was_open = bool(self._servers) or (
            self._listening is not None and bool(self._listening.sockets)
        )
        for server in self._servers:
            server.close()
        self._servers.clear()
        if self._listening is not None:
            self._listening.close()
        return was_open

    async def stop_service(self) -> None:
        """Stop as `stop` does, by the deadline of the stop in progress, else the grace period."""
        await super().stop_service()
        deadline = _stop_deadline.get()
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.grace_period
        await self.stop(deadline)

    async def stop(self, deadline: float) -> None:
        """Close the listeners, let open connections finish until the loop time *deadline*,
        then reset the rest."""
        self.stop_listening()
        await self.drain(deadline)

    async def drain(self, deadline: float) -> None:
        """Wait until the loop time *deadline* for open connections to end, then reset the rest."""
        if not self._connections or self._idle is None:
            return
        started = asyncio.get_running_loop().time()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._idle.wait()
        if self._connections:
            count = self.reset_all()
            log.warning(
                "aborted %d connection(s) on %s still open after %.1f s",
                count,
                self._label,
                asyncio.get_running_loop().time() - started,
            )
            # Let the loop deliver connection_lost so each protocol learns of the reset.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await self._idle.wait()

    def reset_all(self) -> int:
        """Reset every open connection now; return how many there were."""
        leftover = list(self._connections)
        self._aborted += len(leftover)
        for transport in leftover:
            reset(transport)
        return len(leftover)


# The loop time by which the stop in progress must end; set by whoever runs the tree, so
# that every server's drain ends at the same moment however deep in the tree it sits.
_stop_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "tend_stop_deadline", default=None
)


@contextlib.contextmanager
def stopping_by(deadline: float) -> Iterator[None]:
    """Within this block (and tasks it creates), servers stop by the loop time *deadline*."""
    token = _stop_deadline.set(deadline)
    try:
        yield
    finally:
        _stop_deadline.reset(token)


def listeners(tree: Service) -> list[StreamServer]:
    """Every listening service in *tree*, in tree order."""
    return [service for service in walk(tree) if isinstance(service, StreamServer)]


def describe_serving(tree: Service) -> str:
    """One line naming what *tree* listens on, for systemd's STATUS= and tendctl."""
    parts = [
        f"{factory_name(server.protocol_factory)} on {', '.join(server.addresses)}"
        for server in listeners(tree)
        if server.addresses
    ]
    return "serving " + "; ".join(parts) if parts else "running"


class TCPServer(StreamServer):
    """Serve *protocol_factory* on TCP *port* of *interface* (twistd: internet.TCPServer)."""

    def __init__(self, port: int, protocol_factory: ProtocolFactory, interface: str = "") -> None:
        super().__init__(TCPEndpoint(port, interface), protocol_factory)


class UNIXServer(StreamServer):
    """Serve *protocol_factory* on the UNIX socket *path* (twistd: internet.UNIXServer)."""

    def __init__(
        self, path: str, protocol_factory: ProtocolFactory, mode: int | None = None
    ) -> None:
        super().__init__(UNIXEndpoint(path, mode), protocol_factory)


class _Tracking:
    """Forward every event to the user's protocol, telling the server of arrivals and ends."""

    def __init__(self, server: StreamServer, protocol: Any) -> None:
        self._server = server
        self._protocol = protocol
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._server._connection_made(transport)
        self._protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            if self._transport is not None:
                self._server._connection_lost(self._transport)

    def eof_received(self) -> bool | None:
        result: bool | None = self._protocol.eof_received()
        return result

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()


class _TrackedProtocol(_Tracking, asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        self._protocol.data_received(data)


class _TrackedBufferedProtocol(_Tracking, asyncio.BufferedProtocol):
    def get_buffer(self, sizehint: int) -> Any:
        return self._protocol.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._protocol.buffer_updated(nbytes)
