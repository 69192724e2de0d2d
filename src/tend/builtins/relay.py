"""The relay that ``tend socks`` and ``tend portforward`` share, and what goes with it.

A `Relay` copies bytes both ways between a client's connection and the upstream connection
opened for it:

- with backpressure: a side is read only while the other side's transport is below its
  high-water mark, so a peer that never reads makes the relay hold at most one transport
  buffer (asyncio's 64 KiB mark plus one read of at most 64 KiB), however much the other
  side sends;
- passing half-close on: when one side sends end-of-file, the other is sent end-of-file
  (``write_eof``) and bytes go on flowing the other way; both connections close only once
  both directions are done. twistd's socks and portforward close both at the first
  end-of-file, so ``nc -N`` gets nothing back through them;
- ending a connection on which nothing has moved either way for the idle timeout, with a
  reset, as it may be stuck behind a peer that does not read;
- counting the bytes each way for the one access line written when both ends are gone.

`RelayProtocol` is the client's side of a relayed connection (a plugin subclasses it to
decide where to connect), `UpstreamProtocol` the upstream's, and `RelayService` owns a
plugin's listeners, its cap on connections and its connect tasks. Built only on tend's
public API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import TypeVar, cast

from tend import (
    AccessLog,
    MultiService,
    Option,
    StreamServer,
    format_address,
    reset,
    seconds,
)
from tend.builtins.common import warn_if_exposed, whole_number

log = logging.getLogger(__name__)

T = TypeVar("T")

CLIENT = 0
UPSTREAM = 1
_SIDES = ("the client", "the upstream")

# Each read is at most this many bytes (asyncio's own reads take up to 256 KiB): with the
# transports' 64 KiB high-water mark, a connection holds at most about 128 KiB for each
# direction, whatever its peers do.
READ_SIZE = 64 * 1024


class _ReadBuffer(threading.local):
    """The buffer every relayed read of this thread's loop lands in; copied out at once."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))


_read_buffer = _ReadBuffer()


class ReadingProtocol(asyncio.BufferedProtocol):
    """A protocol that reads at most READ_SIZE bytes at a time, into a buffer shared by every
    connection of the thread (the loop runs one callback at a time, and the bytes are
    copied out before the next), and hands them to `received`."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        self.received(bytes(_read_buffer.view[:nbytes]))

    def received(self, data: bytes) -> None:
        """*data* arrived."""


class _End:
    """What the relay knows of one side's connection."""

    __slots__ = ("eof", "full", "lost", "reading", "received", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.received = 0  # bytes read from this side
        self.eof = False  # it sent end-of-file: nothing more will come from it
        self.lost = False  # its connection is gone
        self.full = False  # its write buffer is above the high-water mark
        self.reading = False  # every transport comes to the relay paused


class Relay:
    """Copies bytes both ways between *client* and *upstream*, two connected transports.

    Both transports come paused for reading; the relay resumes them. The protocols that own
    them hand it their events (`received`, `eof_received`, `pause_writing`, `resume_writing`,
    `lost`), each with the side it came from, `CLIENT` or `UPSTREAM`. *header* is written
    to the upstream first (a PROXY protocol header), then *early*, bytes the client sent
    before the upstream was connected; *client_eof* says the client has already sent
    end-of-file. Once both connections are gone, one line goes to *access*: *label*, the
    bytes each way and the time since *started* (the loop's clock).
    """

    def __init__(
        self,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        *,
        label: str,
        access: AccessLog,
        started: float,
        idle_timeout: float | None,
        header: bytes = b"",
        early: bytes = b"",
        client_eof: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._ends = (_End(client), _End(upstream))
        self.label = label
        self._access = access
        self.started = started
        self.idle_timeout = idle_timeout
        self._last = self._loop.time()
        self._ending = ""  # why it ended before both sides were done, for the access line
        self._idle: asyncio.TimerHandle | None = None
        if idle_timeout:
            self._idle = self._loop.call_later(idle_timeout, self._check_idle)
        if header:
            upstream.write(header)
        if early:
            self.received(CLIENT, early)
        if client_eof:
            self.eof_received(CLIENT)
        self._steer()

    def __repr__(self) -> str:
        return f"<Relay {self.label}>"

    @property
    def bytes_up(self) -> int:
        """Bytes read from the client (and written to the upstream)."""
        return self._ends[CLIENT].received

    @property
    def bytes_down(self) -> int:
        """Bytes read from the upstream (and written to the client)."""
        return self._ends[UPSTREAM].received

    @property
    def done(self) -> bool:
        """Whether both connections are gone."""
        return self._ends[CLIENT].lost and self._ends[UPSTREAM].lost

    def received(self, side: int, data: bytes) -> None:
        """*side* sent *data*: pass it to the other side."""
        self._ends[side].received += len(data)
        self._last = self._loop.time()
        other = self._ends[1 - side]
        if not other.lost and not other.transport.is_closing():
            other.transport.write(data)

    def eof_received(self, side: int) -> bool:
        """*side* sent end-of-file: send the other side end-of-file, once its bytes are out.

        Returns True, which tells asyncio to keep the transport open for writing.
        """
        end, other = self._ends[side], self._ends[1 - side]
        if end.eof:
            return True
        end.eof = True
        self._last = self._loop.time()
        if other.eof:
            # Both directions are done: close both once their buffers are written out.
            end.transport.close()
            other.transport.close()
        elif not other.lost and not other.transport.is_closing():
            if other.transport.can_write_eof():
                other.transport.write_eof()
            else:
                other.transport.close()  # TLS cannot half-close: end what can be ended
        self._steer()
        return True

    def pause_writing(self, side: int) -> None:
        """*side*'s write buffer passed its high-water mark: stop reading the other side."""
        self._ends[side].full = True
        self._steer()

    def resume_writing(self, side: int) -> None:
        """*side*'s write buffer fell below its low-water mark: read the other side again."""
        self._ends[side].full = False
        self._steer()

    def lost(self, side: int, error: Exception | None) -> None:
        """*side*'s connection is gone: end the other's, with a reset if this one was cut."""
        end, other = self._ends[side], self._ends[1 - side]
        if end.lost:
            return
        end.lost = True
        if not self._ending:
            if error is not None:
                self._ending = f", {_SIDES[side]}: {reason_of(error)}"
            elif not end.eof:
                self._ending = f", cut short on {_SIDES[side]}'s side"
        if not other.lost:
            if error is not None or not end.eof:
                # A cut stream must not end cleanly on the other side: that would read as whole.
                reset(other.transport)
            else:
                other.transport.close()
        if other.lost:
            self._end()

    def abort(self, why: str) -> None:
        """Reset both connections now; *why* ends the access line."""
        if not self._ending:
            self._ending = f", {why}"
        for end in self._ends:
            if not end.lost:
                reset(end.transport)

    def _steer(self) -> None:
        """Read each side exactly when the other side can take more."""
        for side in (CLIENT, UPSTREAM):
            end, other = self._ends[side], self._ends[1 - side]
            wanted = not (end.eof or end.lost or other.full or other.lost)
            if wanted != end.reading:
                end.reading = wanted
                if not end.lost and not end.transport.is_closing():
                    if wanted:
                        end.transport.resume_reading()
                    else:
                        end.transport.pause_reading()

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        idle_for = self._loop.time() - self._last
        if idle_for < self.idle_timeout:
            self._idle = self._loop.call_later(self.idle_timeout - idle_for, self._check_idle)
            return
        self._idle = None
        self.abort(f"nothing moved for {self.idle_timeout:g} s")

    def _end(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._access.info(
            "%s: %d bytes up, %d bytes down, %.3f s%s",
            self.label,
            self.bytes_up,
            self.bytes_down,
            self._loop.time() - self.started,
            self._ending,
        )


def reason_of(error: BaseException) -> str:
    """An error as a few words for a log line: ``Connection refused``, ``timed out``."""
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, socket.gaierror) and error.strerror:
        return error.strerror
    if isinstance(error, OSError) and error.errno:
        # asyncio's "Connect call failed ('127.0.0.1', 1)" says less than the errno does.
        return os.strerror(error.errno)
    return str(error) or type(error).__name__


class UpstreamProtocol(ReadingProtocol):
    """The upstream connection's protocol: paused until its relay is attached, then hands the
    relay every event."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.relay: Relay | None = None
        # Events before the relay is attached, should a loop deliver any to a paused transport.
        self._early: list[bytes] = []
        self._eof = False
        self._lost: tuple[Exception | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()

    def attach(self, relay: Relay) -> None:
        """Hand every event from now on (and any that came before) to *relay*."""
        self.relay = relay
        for data in self._early:
            relay.received(UPSTREAM, data)
        self._early.clear()
        if self._eof:
            relay.eof_received(UPSTREAM)
        if self._lost is not None:
            relay.lost(UPSTREAM, self._lost[0])

    def received(self, data: bytes) -> None:
        if self.relay is None:
            self._early.append(data)
        else:
            self.relay.received(UPSTREAM, data)

    def eof_received(self) -> bool:
        if self.relay is None:
            self._eof = True
            return True
        return self.relay.eof_received(UPSTREAM)

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.pause_writing(UPSTREAM)

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.resume_writing(UPSTREAM)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is None:
            self._lost = (exc,)
        else:
            self.relay.lost(UPSTREAM, exc)


class Refusal(Exception):
    """The relay will not connect there: a rule said no, not the network."""


# Opens the upstream connection: returns its protocol once connected, or raises OSError
# (TimeoutError included) or Refusal.
OpenUpstream = Callable[[], Awaitable[UpstreamProtocol]]


class RelayProtocol(ReadingProtocol):
    """A client's connection to relay; a subclass decides where to, the rest is shared.

    On arrival the connection counts against the service's cap; past it, it is closed at
    once. Bytes that come before `connect` go to `handshake`. `connect` pauses the client,
    opens the upstream within the service's connect timeout, calls `connected` (which may
    answer the client and returns a header for the upstream) and starts the `Relay`. Every
    connection gets exactly one access line: the relay's, or the one `close_with` writes.
    """

    # The first words of the access line while nothing more is known.
    what = "relay"

    def __init__(self, service: RelayService) -> None:
        self.service = service
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.started = 0.0
        self.relay: Relay | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._early = bytearray()
        self._eof = False
        self._counted = False
        self._logged = False

    def describe(self) -> str:
        """Who and what, for the access line: ``socks5 127.0.0.1:40000 to example.com:80``."""
        return f"{self.what} {self.peer}"

    # -- events ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = format_address(transport.get_extra_info("peername"))
        self.started = asyncio.get_running_loop().time()
        if not self.service.admit():
            self.close_with(f"refused: {self.service.max_connections} connections are open already")
            return
        self._counted = True
        self.accepted()

    def received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.received(CLIENT, data)
        elif self._connecting is not None:
            self._early += data  # at most one read: the client is paused while connecting
        elif not self._logged:
            self.handshake(data)

    def eof_received(self) -> bool:
        if self.relay is not None:
            return self.relay.eof_received(CLIENT)
        self._eof = True
        if self._connecting is not None:
            return True  # passed on to the upstream once connected
        self.close_with("closed by the client before saying where to")
        return False

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.pause_writing(CLIENT)

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.resume_writing(CLIENT)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.service.release()
        self.closed()
        if self.relay is not None:
            self.relay.lost(CLIENT, exc)
            return
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
            self._log("left before the upstream answered")
        else:
            reason = "" if exc is None else f": {reason_of(exc)}"
            self._log(f"closed by the client before saying where to{reason}")

    # -- for subclasses -------------------------------------------------------------------

    def accepted(self) -> None:
        """The connection is admitted: start reading a handshake, or `connect` at once."""

    def handshake(self, data: bytes) -> None:
        """Bytes the client sent before `connect` was called."""
        self.close_with("sent bytes before the relay was ready")

    def closed(self) -> None:
        """The client's connection is gone: drop timers (called before the access line)."""

    def connected(self, upstream: UpstreamProtocol) -> bytes:
        """The upstream is connected: answer the client if the protocol says to; return
        bytes to send the upstream before the client's."""
        return b""

    def connect_failed(self, error: Exception) -> None:
        """The upstream could not be reached: say so to the client and close."""
        self.close_with(f"cannot connect: {reason_of(error)}")

    def connect(self, open_upstream: OpenUpstream, early: bytes = b"") -> None:
        """Stop reading the client and open the upstream; relay once it is connected.

        *early* is what the client sent past its handshake, for the upstream.
        """
        assert self.transport is not None
        self.transport.pause_reading()
        self._early += early
        self._connecting = self.service.spawn(self._connect(open_upstream))

    def close_with(self, outcome: str, *, cut: bool = False) -> None:
        """Write the access line ending in *outcome* and close, with a reset if *cut*."""
        self._log(outcome)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if cut:
                reset(transport)
            else:
                transport.close()

    # -- inside ---------------------------------------------------------------------------

    def _log(self, outcome: str) -> None:
        if not self._logged:
            self._logged = True
            elapsed = asyncio.get_running_loop().time() - self.started
            self.service.access.info("%s: %s, %.3f s", self.describe(), outcome, elapsed)

    async def _connect(self, open_upstream: OpenUpstream) -> None:
        timeout = self.service.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                upstream = await open_upstream()
        except (OSError, Refusal) as error:  # TimeoutError is an OSError
            self._connecting = None
            self.connect_failed(error)
            return
        except Exception:
            self._connecting = None
            self.close_with("cannot connect: an error (the traceback is in the log)", cut=True)
            raise
        self._connecting = None
        client = self.transport
        assert client is not None
        assert upstream.transport is not None
        if client.is_closing():  # closed while the task was finishing
            upstream.transport.close()
            return
        header = self.connected(upstream)
        self.relay = Relay(
            client,
            upstream.transport,
            label=self.describe(),
            access=self.service.access,
            started=self.started,
            idle_timeout=self.service.idle_timeout,
            header=header,
            early=bytes(self._early),
            client_eof=self._eof,
        )
        self._early.clear()
        self._logged = True  # the relay writes the access line
        upstream.attach(self.relay)


async def open_tcp(host: str, port: int) -> UpstreamProtocol:
    """Connect to *host*:*port* (an address, or a name the system resolves)."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(UpstreamProtocol, host, port)
    return protocol


async def open_unix(path: str) -> UpstreamProtocol:
    """Connect to the UNIX socket at *path*."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_unix_connection(UpstreamProtocol, path)
    return protocol


class RelayService(MultiService):
    """A relay plugin's service: its listeners, its cap on connections, its connect tasks.

    Its children are the listeners (`listen_on`); they stop first, draining the relayed
    connections by tend's deadline, then any connect task left is cancelled.
    """

    def __init__(
        self,
        *,
        access: AccessLog,
        max_connections: int,
        connect_timeout: float,
        idle_timeout: float | None,
        exposure: str,
    ) -> None:
        super().__init__()
        self.access = access
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout or None
        self.exposure = exposure  # what the warning for a listener off loopback adds
        self.open_connections = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def listen_on(
        self,
        endpoints: Iterable[str],
        factory: Callable[[], asyncio.BaseProtocol],
        interface: str,
    ) -> None:
        """Add a listener for each endpoint description; a bare port listens on *interface*."""
        for endpoint in endpoints:
            StreamServer(endpoint, factory, default_interface=interface).set_service_parent(self)

    def admit(self) -> bool:
        """Count a new connection in, unless the cap is reached."""
        if self.open_connections >= self.max_connections:
            return False
        self.open_connections += 1
        return True

    def release(self) -> None:
        """Count a connection out."""
        self.open_connections -= 1

    def spawn(self, work: Coroutine[object, object, None]) -> asyncio.Task[None]:
        """Run *work* as a task this service owns: cancelled and awaited when it stops."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("error while relaying", exc_info=error)

    def privileged_start_service(self) -> None:
        """Bind the listeners, then warn once for each that other hosts can reach."""
        super().privileged_start_service()
        for server in self:
            if isinstance(server, StreamServer):
                warn_if_exposed(server, self.exposure, log)

    async def stop_service(self) -> None:
        """Stop the listeners (which drain their connections), then cancel what is left."""
        await super().stop_service()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class RelayFactory:
    """Makes a *protocol* for each client, all sharing one service. A plugin subclasses it
    under a name of its own, which the listener logs (``SocksFactory starting on 1080``)."""

    protocol: type[RelayProtocol]

    def __init__(self, service: RelayService) -> None:
        self.service = service

    def __call__(self) -> RelayProtocol:
        return self.protocol(self.service)


# -- options ----------------------------------------------------------------------------


def given(options: Mapping[str, object], key: str, kind: type[T]) -> list[T]:
    """The values of a repeatable option, each of *kind* (a list; empty if not given)."""
    values = options.get(key)
    if not isinstance(values, list):
        raise TypeError(f"{key}: expected a list of values, not {values!r}")
    return [value for value in values if isinstance(value, kind)]


# A number of connections, at least 1.
connection_cap = whole_number(1, 1_000_000, "count")


# The options socks and portforward share.
IFACE = Option("iface", None, "127.0.0.1", "The interface a bare port listens on.")
IDLE_TIMEOUT = Option(
    "idle-timeout",
    None,
    "300",
    "Reset a relayed connection on which nothing moved for this many seconds; 0: never.",
    type=seconds,
    metavar="SECONDS",
)
MAX_CONNECTIONS = Option(
    "max-connections",
    None,
    "256",
    "Close new clients at once while this many are open.",
    type=connection_cap,
    metavar="N",
)


def number(options: Mapping[str, object], key: str) -> float:
    """An option's converted number."""
    value = options[key]
    if isinstance(value, int | float):
        return float(value)
    return float(str(value))
