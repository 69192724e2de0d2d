"""Listening services: StreamServer, TCPServer, UNIXServer.

A listening service binds in the privileged phase (so a low port works before tend drops
root), serves once started, and on stop closes its listeners, lets open connections
finish until a deadline, then resets the rest. It owns its connections' lifetimes and
nothing else; protocols are plain asyncio protocols.

It also owns how connections are accepted: at most a `ConnectionLimit` of them at once
(``--max-connections``), the rest waiting in the kernel's listen backlog, so that the
process does not run out of descriptors; and when accept() fails all the same, a pause and
a retry instead of a busy loop. `AcceptErrorLog` is the event loop's exception handler
that logs such failures at most once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import logging
import os
import resource
import socket
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

from tend.addresses import format_address
from tend.endpoints import Endpoint, Listening, TCPEndpoint, UNIXEndpoint, parse_endpoint
from tend.service import Service, walk

log = logging.getLogger("tend")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

# How long connections in flight may run on after a stop, unless the stop in progress
# gives its own deadline (see stopping_by).
DEFAULT_GRACE_PERIOD = 10.0

# Descriptors the default connection limit leaves free below the open-file limit, beyond
# those open when serving starts: for what a server opens besides its connections (an
# upstream fetch, a log file reopened, a resolver's socket), and for the connections
# uvloop accepts in one go before tend can stop it at the limit.
SPARE_DESCRIPTORS = 16

# After accept() fails (out of descriptors, say), how long before trying again, unless a
# connection closes first.
ACCEPT_RETRY_DELAY = 0.5

# accept()'s errors for a process or system out of something: asyncio's "out of system
# resource".
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

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

    Not from ``resume_writing`` itself: asyncio (3.11) ends a connection twice when it is
    closed there with its buffer empty; schedule the call with ``loop.call_soon`` instead.
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


def default_max_connections() -> int:
    """The connection limit ``--max-connections 0`` means: the soft open-file limit
    (``ulimit -n``), less the descriptors open now, less `SPARE_DESCRIPTORS`; at least 1."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20  # Linux's own ceiling on descriptors (fs.nr_open) by default
    try:
        in_use = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir used
    except OSError:  # no /proc (a chroot without it): assume a busy process
        in_use = 64
    return max(1, soft - in_use - SPARE_DESCRIPTORS)


class _Occasional:
    """Logs an event at once, then at most once every *interval* seconds with a count."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._count = 0
        self._line: tuple[int, str, tuple[object, ...]] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def note(
        self, loop: asyncio.AbstractEventLoop, level: int, message: str, *args: object
    ) -> None:
        """Count one event; log it now unless a line was written less than *interval* ago.

        *message* ends with ``%s``: nothing for one event, else how often it happened, as
        `` (12 times in the last 1 s)``.
        """
        self._count += 1
        self._line = (level, message, args)
        if self._timer is None:
            self._flush(loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if not self._count or self._line is None:
            return
        level, message, args = self._line
        count = (
            "" if self._count == 1 else f" ({self._count} times in the last {self.interval:g} s)"
        )
        log.log(level, message, *args, count)
        self._count = 0
        if not loop.is_closed():
            self._timer = loop.call_later(self.interval, self._flush, loop)


class AcceptErrorLog:
    """An event loop exception handler: accept() out of descriptors, logged at most once a
    second with a count; anything else to the loop's default handler.

    asyncio reports each failed accept() with a traceback, up to a thousand a second when
    the process is out of descriptors; StreamServer reports its own the same way. The serve
    loop installs one on its event loop.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self._occasional = _Occasional(interval)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: Mapping[str, Any]) -> None:
        error = context.get("exception")
        message = str(context.get("message", ""))
        if isinstance(error, OSError) and error.errno in _RESOURCE_ERRORS and "accept" in message:
            where = _describe_listener(context.get("socket"))
            self._occasional.note(
                loop,
                logging.ERROR,
                "cannot accept connections%s: %s; "
                "raise the open-file limit (ulimit -n) or lower --max-connections%s",
                where,
                error.strerror,
            )
            return
        loop.default_exception_handler(dict(context))


def _describe_listener(sock: object) -> str:
    getsockname = getattr(sock, "getsockname", None)
    if getsockname is None:
        return ""
    try:
        return f" on {format_address(getsockname())}"
    except (OSError, ValueError, TypeError):
        return ""


class ConnectionLimit:
    """The most connections the listeners of one process hold open at once.

    One limit is shared by every StreamServer of a worker (``--max-connections``), since
    what runs out is the process's descriptors. At the limit they all stop accepting;
    clients that arrive meanwhile wait in the kernel's listen backlog (the endpoint's
    ``backlog=``) and are taken as connections close.
    """

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError(f"a connection limit must be at least 1, not {maximum}")
        self.maximum = maximum
        self.open = 0  # made and not yet lost
        self.arriving = 0  # accepted by tend, not yet made (a TLS handshake, say)
        self._servers: list[StreamServer] = []
        self._waiting: set[StreamServer] = set()  # serving, but not accepting
        self._waking: asyncio.Handle | None = None
        self._full = _Occasional(60.0)

    def __repr__(self) -> str:
        return f"<ConnectionLimit {self.open}+{self.arriving} of {self.maximum}>"

    @property
    def room(self) -> int:
        """How many more connections may be accepted now."""
        return self.maximum - self.open - self.arriving

    def _opened(self) -> None:
        self.open += 1
        if self.open + self.arriving >= self.maximum:
            self._pause()

    def _closed(self) -> None:
        self.open -= 1
        if self._waiting:
            self._wake()

    def _pause(self) -> None:
        """Stop every server accepting: the limit is reached."""
        loop = asyncio.get_running_loop()
        paused = False
        for server in self._servers:
            paused = server._stop_accepting() or paused
        if paused:
            self._full.note(
                loop,
                logging.WARNING,
                "reached the limit of %d connections (--max-connections): new clients wait "
                "in the listen backlog%s",
                self.maximum,
            )

    def _wake(self) -> None:
        """Soon, let the servers waiting for room accept again, if there is room."""
        if self._waking is None and self.room > 0:
            self._waking = asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        self._waking = None
        for server in list(self._waiting):
            if self.room <= 0:
                break
            server._accept_again()


def limit_connections(tree: Service, maximum: int) -> ConnectionLimit:
    """Share one limit of *maximum* connections (0: `default_max_connections`) among every
    listener in *tree*; call it in the process that serves, before the tree starts."""
    limit = ConnectionLimit(maximum or default_max_connections())
    for server in listeners(tree):
        server.connection_limit = limit
    return limit


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

    It accepts at most ``connection_limit.maximum`` connections at once, a limit the
    serve loop shares among all the listeners of a worker (`limit_connections`); one left
    unset when the server starts is its own, of `default_max_connections`. On asyncio's
    loop tend accepts connections itself (asyncio's accept is Python too, and floods the
    log when it runs out of descriptors); on uvloop the loop accepts, on a duplicate of
    each listening socket that is closed at the limit. Either way the clients beyond the
    limit wait in the listen backlog, and one accept() error pauses accepting for
    `ACCEPT_RETRY_DELAY`, or until a connection closes.
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
        self.connection_limit: ConnectionLimit | None = None
        self._listening: Listening | None = None
        self._connections: set[asyncio.BaseTransport] = set()
        self._idle: asyncio.Event | None = None
        self._aborted = 0
        self._served = 0
        self._label = str(self.endpoint)
        # How connections are accepted (see the class docstring).
        self._limit: ConnectionLimit | None = None
        self._serving = False
        self._accepting = False
        self._accepts_itself = True
        self._servers: list[asyncio.AbstractServer] = []  # the loop's, on duplicate sockets
        self._openings: set[asyncio.Task[None]] = set()  # _open_servers in flight
        self._generation = 0  # of _accepting: an opening that finds it changed is late
        self._retry: asyncio.TimerHandle | None = None
        self._arriving: set[asyncio.Task[None]] = set()

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
    def served(self) -> int:
        """How many connections this server has accepted since it started."""
        return self._served

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

    def adopt(self, listening: Listening) -> None:
        """Listen on *listening*, already bound (by the generation before a reload)."""
        self._listening = listening
        self._label = listening.label

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
        if self.connection_limit is None:
            self.connection_limit = ConnectionLimit(default_max_connections())
        limit = self._limit = self.connection_limit
        if self not in limit._servers:
            limit._servers.append(self)
        log.info("%s starting on %s", factory_name(self.protocol_factory), listening.where)
        self._accepts_itself = isinstance(loop, asyncio.SelectorEventLoop)
        try:
            for sock in listening.sockets:
                # Set either way: a socket systemd passes keeps what an earlier run set.
                linger = _LINGER_RESET if self.armed else _LINGER_OFF
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                sock.setblocking(False)
                # The backlog asked for, whoever accepts: uvloop's own listen() sets it too.
                sock.listen(self.endpoint.backlog)
            self._serving = True
            self._accept_again()
            if self._openings:  # uvloop: the first servers, so that a bug there fails the start
                await asyncio.gather(*self._openings)
        except BaseException:
            self._close()
            raise
        await super().start_service()

    # -- accepting ---------------------------------------------------------------------

    def _accept_again(self) -> None:
        """Accept connections again, if serving, not accepting already and there is room.

        tend takes what waits in the backlog itself, as far as there is room; on uvloop,
        once the backlog is empty, the loop's own accept takes over, on duplicate sockets.
        """
        limit = self._limit
        if not self._serving or self._accepting or limit is None or self._listening is None:
            return
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        loop = asyncio.get_running_loop()
        sockets = self._listening.sockets
        if self._accepts_itself:
            for sock in sockets:
                loop.add_reader(sock.fileno(), self._accept_from, sock)
        else:
            # The loop would take every waiting client in one go, past the limit and the
            # descriptors; so tend takes them, up to the room there is.
            for sock in sockets:
                if not self._accept_from(sock):
                    return
            opening = loop.create_task(self._open_servers(self._generation + 1))
            self._openings.add(opening)
            opening.add_done_callback(self._openings.discard)
        self._accepting = True
        self._generation += 1
        limit._waiting.discard(self)

    def _stop_accepting(self) -> bool:
        """Stop accepting, if it was (the backlog holds new clients); True if it was.

        A server still serving then waits for room (`ConnectionLimit._wake`) or a retry.
        """
        was_accepting = self._accepting
        if was_accepting:
            self._accepting = False
            self._generation += 1
            if self._accepts_itself and self._listening is not None:
                loop = asyncio.get_running_loop()
                for sock in self._listening.sockets:
                    loop.remove_reader(sock.fileno())
            for server in self._servers:
                server.close()
            self._servers.clear()
        if self._serving and self._limit is not None:
            self._limit._waiting.add(self)
        return was_accepting

    def _accept_from(self, sock: socket.socket) -> bool:
        """Accept what waits on *sock* while there is room; True if its backlog is empty."""
        limit = self._limit
        assert limit is not None
        while limit.room > 0:
            try:
                connection, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except ConnectionAbortedError:  # the client gave up while it waited
                continue
            except OSError as error:
                self._accept_failed(sock, error)
                return False
            self._adopt(connection)
        limit._pause()
        return False

    def _accept_failed(self, sock: socket.socket, error: OSError) -> None:
        """Report a failed accept() (out of descriptors, say) and pause accepting a while."""
        loop = asyncio.get_running_loop()
        self._stop_accepting()
        resource_error = error.errno in _RESOURCE_ERRORS
        loop.call_exception_handler(
            {
                "message": "socket.accept() out of system resource"
                if resource_error
                else "socket.accept() failed",
                "exception": error,
                "socket": sock,
            }
        )
        if self._retry is None:
            self._retry = loop.call_later(ACCEPT_RETRY_DELAY, self._retry_accepting)

    def _retry_accepting(self) -> None:
        self._retry = None
        self._accept_again()

    def _adopt(self, connection: socket.socket) -> None:
        """Hand a connection tend accepted to the loop, counted until it is made."""
        assert self._limit is not None
        self._limit.arriving += 1
        task = asyncio.get_running_loop().create_task(self._arrive(connection))
        self._arriving.add(task)
        task.add_done_callback(self._arriving.discard)

    async def _arrive(self, connection: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        limit = self._limit
        assert limit is not None
        assert self._listening is not None
        try:
            await loop.connect_accepted_socket(
                self._make_protocol, connection, ssl=self._listening.tls
            )
        except OSError:
            # A failed TLS handshake or a client gone: the transport is closed, or never was.
            connection.close()
        except asyncio.CancelledError:
            connection.close()
            raise
        except Exception as error:
            connection.close()
            loop.call_exception_handler(
                {"message": "cannot serve an accepted connection", "exception": error}
            )
        finally:
            limit.arriving -= 1
            if limit._waiting:
                limit._wake()

    async def _open_servers(self, generation: int) -> None:
        """Let uvloop accept, on a duplicate of each listening socket (closed at the limit)."""
        assert self._listening is not None
        loop = asyncio.get_running_loop()
        servers: list[asyncio.AbstractServer] = []
        try:
            for sock in self._listening.sockets:
                duplicate = sock.dup()
                try:
                    opened = await loop.create_server(
                        self._make_protocol,
                        sock=duplicate,
                        backlog=self.endpoint.backlog,
                        ssl=self._listening.tls,
                    )
                except BaseException:
                    duplicate.close()
                    raise
                servers.append(opened)
        except OSError as error:  # out of descriptors for the duplicate, say
            for server in servers:
                server.close()
            if generation == self._generation:
                self._accept_failed(self._listening.sockets[0], error)
            return
        if generation == self._generation:
            self._servers.extend(servers)
        else:  # stopped accepting meanwhile
            for server in servers:
                server.close()

    def _make_protocol(self) -> asyncio.BaseProtocol:
        protocol = self.protocol_factory()
        if isinstance(protocol, asyncio.BufferedProtocol):
            return _TrackedBufferedProtocol(self, protocol)
        return _TrackedProtocol(self, protocol)

    def _connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._served += 1
        self._connections.add(transport)
        if self._idle is not None:
            self._idle.clear()
        if self._limit is not None:
            self._limit._opened()

    def _connection_lost(self, transport: asyncio.BaseTransport) -> None:
        self._connections.discard(transport)
        if not self._connections and self._idle is not None:
            self._idle.set()
        if self._limit is not None:
            self._limit._closed()

    def stop_listening(self) -> None:
        """Stop accepting new connections at once (twistd's "Closed" line); those open go on."""
        if self._close():
            log.info("(%s Closed)", self._label)

    def _close(self) -> bool:
        """Close the listeners; True if any were open."""
        was_open = bool(self._servers) or (
            self._listening is not None and bool(self._listening.sockets)
        )
        self._serving = False
        self._stop_accepting()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._limit is not None:
            self._limit._waiting.discard(self)
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
        loop = asyncio.get_running_loop()
        # Clients accepted before the listeners closed are served like the others: tend's
        # own accepts still being made (a TLS handshake, say) get until the deadline, and
        # a late opening closes what it opened.
        pending = self._arriving | self._openings
        if pending:
            _, late = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        # The loop's own accepts (uvloop's) make their protocols on its next turns: until
        # then the connections are not counted, and a drain would find none to wait for.
        for _ in range(2):
            await asyncio.sleep(0)
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
