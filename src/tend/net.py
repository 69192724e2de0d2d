"""Listening services: StreamServer, TCPServer, UNIXServer.

A listening service binds in the privileged phase (so a low port works before tend drops
root), serves once started, and on stop closes its listeners, lets open connections
finish until a deadline, then resets the rest. It owns its connections' lifetimes and
nothing else; protocols are plain asyncio protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tend.endpoints import (
    Endpoint,
    TCPEndpoint,
    TLSEndpoint,
    UNIXEndpoint,
    describe_socket,
    listen,
    parse_endpoint,
    tls_context,
)
from tend.service import Service

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("tend")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

# How long connections in flight may run on after a stop, unless the runner says otherwise.
DEFAULT_GRACE_PERIOD = 10.0

_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(transport: asyncio.BaseTransport) -> None:
    """Abort *transport* with a TCP reset, so the peer can tell a cut stream from a whole one.

    In stream protocols such as poetry a clean end-of-file means "that was all", so a
    connection cut short must not end with one: SO_LINGER 0 makes close send RST.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


def factory_name(protocol_factory: object) -> str:
    """The name twistd would show for a factory: its class or function name."""
    name = getattr(protocol_factory, "__qualname__", None)
    return name if isinstance(name, str) else type(protocol_factory).__qualname__


class StreamServer(Service):
    """Serve *protocol_factory* on a stream endpoint (twistd: strports.service).

    *endpoint* is a description such as ``tcp:10000:interface=127.0.0.1``,
    ``unix:/run/poetry.sock``, ``tls:8443:certKey=server.pem`` or ``systemd:index=0``,
    or an already parsed endpoint.
    """

    def __init__(
        self,
        endpoint: str | Endpoint,
        protocol_factory: ProtocolFactory,
        *,
        default_interface: str = "",
    ) -> None:
        super().__init__()
        self.endpoint = (
            parse_endpoint(endpoint, default_interface) if isinstance(endpoint, str) else endpoint
        )
        self.protocol_factory = protocol_factory
        self.grace_period = DEFAULT_GRACE_PERIOD
        # Set by the runner so that every server's drain ends at the same moment.
        self.drain_deadline: float | None = None
        self.aborted_connections = 0
        self._sockets: list[socket.socket] = []
        # With --workers N the supervisor asks for N copies of a TCP listener, each bound
        # with SO_REUSEPORT, so that the kernel spreads connections over the workers (see
        # use_copy); _copies holds them all, _sockets the ones this process accepts on.
        self.listen_copies = 1
        self._copies: list[list[socket.socket]] = []
        self._socket_file: _SocketFile | None = None  # a UNIX socket's file this process made
        self._tls: ssl.SSLContext | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.BaseTransport] = set()
        self._idle: asyncio.Event | None = None
        self._label = self._describe()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.endpoint} {factory_name(self.protocol_factory)}>"

    @property
    def addresses(self) -> list[str]:
        """The addresses actually bound, e.g. ``127.0.0.1:43123`` after asking for port 0."""
        return [describe_socket(sock) for sock in self._sockets]

    @property
    def port(self) -> int | None:
        """The TCP port actually bound, once bound."""
        for sock in self._sockets:
            if sock.family != socket.AF_UNIX:
                port: int = sock.getsockname()[1]
                return port
        return None

    @property
    def connection_count(self) -> int:
        """How many connections are open right now."""
        return len(self._connections)

    def privileged_start_service(self) -> None:
        """Bind the listening sockets and read TLS keys, as the starting user."""
        if not self._sockets:
            if isinstance(self.endpoint, TLSEndpoint) and self._tls is None:
                # Before binding, so a bad key leaves no socket open behind it.
                self._tls = tls_context(self.endpoint)
            self._copies = self._listen_copies()
            self._sockets = self._copies[0]
            if isinstance(self.endpoint, UNIXEndpoint):
                self._socket_file = _SocketFile.bound_at(self.endpoint.path)
            self._label = self._describe()
        super().privileged_start_service()

    def _listen_copies(self) -> list[list[socket.socket]]:
        tcp = self.endpoint.tcp if isinstance(self.endpoint, TLSEndpoint) else self.endpoint
        if self.listen_copies <= 1 or not isinstance(tcp, TCPEndpoint):
            # UNIX and passed sockets are shared by every worker as they are.
            return [self.listen()]
        copies = [listen(replace(tcp, reuse_port=True))]
        try:
            port = copies[0][0].getsockname()[1]  # port 0 picked one: every copy takes it
            for _ in range(self.listen_copies - 1):
                copies.append(listen(replace(tcp, port=port, reuse_port=True)))
        except BaseException:
            for sock in (sock for copy in copies for sock in copy):
                sock.close()
            raise
        return copies

    def use_copy(self, index: int) -> None:
        """In a worker: accept on copy *index* of the listener only, closing the others here.

        The supervisor keeps every copy open, so connections queued on a dead worker's
        copy wait for its replacement rather than being refused.
        """
        if len(self._copies) > 1:
            for number, copy in enumerate(self._copies):
                if number != index:
                    for sock in copy:
                        sock.close()
            self._sockets = self._copies[index]
            self._copies = [self._sockets]

    def listen(self) -> list[socket.socket]:
        """Open this server's listening sockets; subclasses may take them from elsewhere."""
        return listen(self.endpoint)

    async def start_service(self) -> None:
        """Start accepting connections on the sockets bound earlier."""
        if not self._sockets:
            self.privileged_start_service()
        loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        log.info("%s starting on %s", factory_name(self.protocol_factory), self._where())
        try:
            for sock in self._sockets:
                # asyncio calls listen() again with this, and accepts up to this many per wakeup.
                server = await loop.create_server(
                    self._make_protocol, sock=sock, backlog=self.endpoint.backlog, ssl=self._tls
                )
                self._servers.append(server)
        except BaseException:
            self.close_listeners()
            raise
        await super().start_service()

    def _where(self) -> str:
        if isinstance(self.endpoint, UNIXEndpoint):
            return self.endpoint.path
        if self.port is not None:
            return str(self.port)
        return ", ".join(self.addresses) or str(self.endpoint)

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
        """Stop accepting new connections at once; those open carry on."""
        if self._servers or self._sockets:
            self.close_listeners()
            log.info("(%s Closed)", self._label)

    def _describe(self) -> str:
        if isinstance(self.endpoint, UNIXEndpoint):
            return f"UNIX Port {self.endpoint.path}"
        if self.port is not None:
            return f"TCP Port {self.port}"
        if isinstance(self.endpoint, TCPEndpoint | TLSEndpoint):
            return f"TCP Port {self.endpoint.port}"
        # Sockets systemd passed, none of them TCP: UNIX ones, once taken.
        return f"UNIX Port {', '.join(self.addresses)}" if self._sockets else str(self.endpoint)

    def close_listeners(self) -> None:
        """Close the listening sockets quietly (after a failed start, or on stop)."""
        for server in self._servers:
            server.close()
        self._servers.clear()
        for sock in (sock for copy in self._copies or [self._sockets] for sock in copy):
            sock.close()
        self._sockets = []
        self._copies = []
        if self._socket_file is not None:
            self._socket_file.remove()
            self._socket_file = None

    async def stop_service(self) -> None:
        """Close the listeners, drain open connections until the deadline, reset the rest."""
        await super().stop_service()
        self.stop_listening()
        loop = asyncio.get_running_loop()
        deadline = self.drain_deadline
        if deadline is None:
            deadline = loop.time() + self.grace_period
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
        self.aborted_connections += len(leftover)
        for transport in leftover:
            reset(transport)
        return len(leftover)


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


class _SocketFile:
    """The file of a UNIX socket this process bound, to remove when it stops listening.

    Only files tend bound are removed (a passed socket's file belongs to systemd, which
    needs it to start tend again), only by the process that bound it (a worker sharing its
    supervisor's socket must leave it), and only if it is still that socket: the folder is
    held open and the inode compared, so neither a chroot nor a new file at the same path
    makes tend remove the wrong thing.
    """

    def __init__(self, folder: int, name: str, inode: tuple[int, int]) -> None:
        self.folder = folder
        self.name = name
        self.inode = inode
        self.owner = os.getpid()

    @classmethod
    def bound_at(cls, path: str) -> _SocketFile | None:
        folder_path, name = os.path.split(path)
        try:
            folder = os.open(folder_path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            status = os.stat(name, dir_fd=folder)
        except OSError:
            os.close(folder)
            return None
        return cls(folder, name, (status.st_dev, status.st_ino))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            if os.getpid() == self.owner:
                status = os.stat(self.name, dir_fd=self.folder)
                if (status.st_dev, status.st_ino) == self.inode:
                    os.unlink(self.name, dir_fd=self.folder)
        with contextlib.suppress(OSError):
            os.close(self.folder)


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
