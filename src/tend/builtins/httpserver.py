"""HTTP/1.1 connections for ``tend web``: h11 parses, this module times, limits and sends.

One `HTTPConnection` per client reads requests through h11 and answers them one at a
time, in order, so pipelined requests get their answers in the order asked. It owns the
connection's limits: a first-line and header timeout, an idle timeout between requests
and for a client that stops reading, a cap on the head's size, on the bytes read ahead
and on open connections, and a short lingering close so that an error reply reaches a
client still sending. Bodies are sent by ``loop.sendfile`` (zero-copy where the loop and
transport allow it; asyncio itself copies through memory for TLS), or read and written
in pieces on a loop that has no sendfile (uvloop). What to answer is `Site`'s business.

Importing it needs h11 (``pip install 'tend[web]'``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

import h11

from tend import AccessLog, __version__, format_address, reset
from tend.builtins.httpfiles import FileSlice, Reply, Site, error_reply, http_date

log = logging.getLogger("tend.builtins.web")
access = AccessLog("tend.builtins.web")

SERVER = f"tend/{__version__}"

# Read no further ahead than this while a request is being answered: pipelined requests
# wait in the kernel, not in memory.
READ_AHEAD = 64 * 1024

# A GET or HEAD may carry a body (nothing uses it); one larger than this closes the
# connection with 413. Other methods with a body get 405 and a close, unread.
MAX_BODY = 64 * 1024

# A request target longer than this gets 414 (the head's cap bounds it anyway).
MAX_TARGET = 8 * 1024

# At most this many header fields (the head's byte cap bounds them too).
MAX_HEADERS = 100

# Each loop.sendfile call sends at most this much and must finish within the idle timeout:
# a client that reads slower than this per idle timeout is cut off.
SENDFILE_PIECE = 256 * 1024

# After the last response on a connection, how long to wait for the client's end before
# closing anyway; closing with its bytes unread would reset the connection and could lose
# the error reply it has not read yet.
LINGER = 2.0


@dataclass(frozen=True, slots=True)
class Limits:
    """How long and how much one connection may take."""

    idle_timeout: float = 30.0
    header_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_connections: int = 256


class HTTPFactory:
    """Makes a connection per client, all serving one `Site`; counts and stops them."""

    def __init__(self, site: Site, limits: Limits) -> None:
        self.site = site
        self.limits = limits
        self.connections: set[HTTPConnection] = set()
        self.stopping = False
        # Set once the loop turns out to have no loop.sendfile (uvloop).
        self.copy_bodies = False

    def __call__(self) -> asyncio.Protocol:
        return HTTPConnection(self)

    def stop(self) -> None:
        """Close idle connections now; the others close after the response in progress."""
        self.stopping = True
        for connection in list(self.connections):
            connection.wake()


class _Peer:
    """The client's host as the access log shows it, formatted only if a line is written."""

    __slots__ = ("address",)

    def __init__(self, address: object) -> None:
        self.address = address

    def __str__(self) -> str:
        if isinstance(self.address, tuple) and self.address:
            return str(self.address[0])
        return format_address(self.address)


class _Date:
    """The Date header's value, formatted once a second."""

    second = -1
    text = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.text = http_date(second)
            cls.second = second
        return cls.text


class _LogTime:
    """Now in the common log format's form, formatted only if a line is written."""

    __slots__ = ()
    _second = -1
    _text = ""

    def __str__(self) -> str:
        second = int(time.time())
        if second != _LogTime._second:
            _LogTime._text = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(second))
            _LogTime._second = second
        return _LogTime._text


def _escape(raw: bytes) -> str:
    """Request bytes as the log may show them: printable ASCII, the rest as ``\\xNN``."""
    text = raw.decode("latin-1")
    if text.isprintable() and text.isascii() and '"' not in text and "\\" not in text:
        return text
    return "".join(
        char if " " <= char < "\x7f" and char not in '"\\' else f"\\x{ord(char):02x}"
        for char in text
    )


class HTTPConnection(asyncio.Protocol):
    """One client's connection: reads requests, answers each in turn, then closes."""

    def __init__(self, factory: HTTPFactory) -> None:
        self.factory = factory
        self.limits = factory.limits
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=factory.limits.max_header_bytes
        )
        self.transport: asyncio.Transport | None = None
        self.peer = _Peer(None)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._eof = False
        self._eof_fed = False
        self._lost = False
        self._reading_paused = False
        self._readable = asyncio.Event()
        self._writable: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._lingering = False
        self._linger_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle = True
        self._busy = False
        self._sent = 0  # body bytes of the reply being sent, for its log line

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = _Peer(transport.get_extra_info("peername"))
        self.factory.connections.add(self)
        self._busy = len(self.factory.connections) > self.limits.max_connections
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the answer is sent; what the client still sends is dropped
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > READ_AHEAD and not self._reading_paused:
            self._reading_paused = True
            self._pause_reading()
        self._readable.set()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._readable.set()
        if self._lingering or self.transport is None:
            return False
        # Keep the way back open to answer what was asked before the end (half-close);
        # a TLS transport cannot, and says so if asked.
        return self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.factory.connections.discard(self)
        self._readable.set()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def wake(self) -> None:
        """Let the connection look again at whether it should close (the server stops)."""
        if self._idle:
            self._readable.set()

    # -- reading ---------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _feed(self) -> bool:
        """Hand h11 what has arrived; False if nothing had (and no end either)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                if not self.transport.is_closing():
                    self.transport.resume_reading()
            self.h11.receive_data(data)
            return True
        if self._eof and not self._eof_fed:
            self._eof_fed = True
            self.h11.receive_data(b"")
            return True
        return False

    async def _wait(self, deadline: float) -> bool:
        """Wait until something arrives, or the loop time *deadline*; False if nothing did."""
        self._readable.clear()
        if self._pending or (self._eof and not self._eof_fed) or self._lost:
            return True
        try:
            async with asyncio.timeout_at(deadline):
                await self._readable.wait()
        except TimeoutError:
            return False
        return True

    async def _next_event(self, deadline: float) -> h11.Event | type[h11.NEED_DATA] | None:
        """The next h11 event, waiting until *deadline* for data; None on a timeout.

        Raises:
            h11.RemoteProtocolError: the client sent something that is not HTTP/1.1.
        """
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return cast(h11.Event, event)
            if self._feed():
                continue
            if self._lost or not await self._wait(deadline):
                return None

    async def _read_request(self, first: bool) -> h11.Request | None:
        """The next request's head, or None when the connection should close."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        # The first request must come within the header timeout; later ones may start
        # within the idle timeout, and must then be whole within the header timeout.
        deadline = loop.time() + (limits.header_timeout if first else limits.idle_timeout)
        started: float | None = None
        while True:
            self._idle = started is None and not self._pending
            if self._idle and self.factory.stopping:
                return None
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as error:
                await self._refuse_unparsable(error, started)
                return None
            if isinstance(event, h11.Request):
                self._idle = False
                return event
            if event is not h11.NEED_DATA:
                return None  # ConnectionClosed (or a state that cannot carry on)
            if self._feed():
                if started is None:
                    started = loop.time()
                    if not first:  # the first head's deadline runs from the connect
                        deadline = started + limits.header_timeout
                continue
            if self._lost:
                return None
            if not await self._wait(deadline):
                if started is not None:  # a silent or idle client is just closed
                    await self._refuse(HTTPStatus.REQUEST_TIMEOUT, "-", started)
                return None

    async def _refuse_unparsable(
        self, error: h11.RemoteProtocolError, started: float | None
    ) -> None:
        if self._lost:
            return
        # h11's hint: 431 for a head over the cap, else 400. A client that has half-closed
        # may still read the answer.
        await self._refuse(error.error_status_hint, "-", started)

    async def _read_body(self) -> bool:
        """Read and drop a request body; False if it is too large, late or broken."""
        deadline = asyncio.get_running_loop().time() + self.limits.header_timeout
        size = 0
        while True:
            try:
                event = await self._next_event(deadline)
            except h11.RemoteProtocolError:
                return False
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    return False
                continue
            return isinstance(event, h11.EndOfMessage)

    # -- answering -------------------------------------------------------------------

    async def _serve(self) -> None:
        first = True
        try:
            while True:
                request = await self._read_request(first)
                first = False
                if request is None:
                    break
                await self._answer(request)
                if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                    break
                self.h11.start_next_cycle()
        except Exception:
            log.exception("connection from %s failed", self.peer)
            self._abort()
        finally:
            self._close()

    async def _answer(self, request: h11.Request) -> None:
        started = asyncio.get_running_loop().time()
        method = request.method.decode("ascii", "replace")
        version = request.http_version.decode("ascii", "replace")
        line = f"{_escape(request.method)} {_escape(request.target)} HTTP/{version}"
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key = name.decode("ascii")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        reply: Reply
        if "content-length" in headers and "transfer-encoding" in headers:
            # Both framings at once is how requests are smuggled past a proxy: refuse.
            reply = error_reply(HTTPStatus.BAD_REQUEST, close=True)
        elif self._busy:
            reply = error_reply(
                HTTPStatus.SERVICE_UNAVAILABLE, close=True, headers=(("retry-after", "1"),)
            )
        elif (
            len(request.headers) > MAX_HEADERS or _head_size(request) > self.limits.max_header_bytes
        ):
            # h11 caps a head that arrives in pieces; one that arrived whole is measured here.
            reply = error_reply(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, close=True)
        elif method not in ("GET", "HEAD"):
            reply = error_reply(
                HTTPStatus.METHOD_NOT_ALLOWED, close=has_body, headers=(("allow", "GET, HEAD"),)
            )
        elif not await self._read_body():
            reply = error_reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, close=True)
        elif len(request.target) > MAX_TARGET:
            reply = error_reply(HTTPStatus.REQUEST_URI_TOO_LONG)
        else:
            reply = await self._respond(method, request.target, headers)
        if not has_body and self.h11.their_state is h11.SEND_BODY:
            await self._read_body()  # the end of a body-less request, before answering
        await self._send(reply, method, line, started)

    async def _respond(self, method: str, target: bytes, headers: Mapping[str, str]) -> Reply:
        """Ask the site in a worker thread (it touches the disk); never leak its file."""
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(None, self.factory.site.respond, method, target, headers)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(_discard_reply)
            raise
        except Exception:
            log.exception("failed to answer %s %s", method, _escape(target))
            return error_reply(HTTPStatus.INTERNAL_SERVER_ERROR, close=True)

    async def _refuse(self, status: int, line: str, started: float | None) -> None:
        """Answer a request that could not be read, and close."""
        loop = asyncio.get_running_loop()
        await self._send(
            error_reply(status, close=True),
            "GET",
            line,
            loop.time() if started is None else started,
        )

    async def _send(self, reply: Reply, method: str, line: str, started: float) -> None:
        self._sent = 0
        status = reply.status
        try:
            headers = [("date", _Date.now()), ("server", SERVER), *reply.headers]
            if reply.close or self.factory.stopping:
                headers.append(("connection", "close"))
            try:
                head = self.h11.send(
                    h11.Response(
                        status_code=status,
                        headers=headers,
                        reason=HTTPStatus(status).phrase.encode("ascii"),
                    )
                )
            except h11.LocalProtocolError:
                return  # h11 cannot answer in this state (the client broke off)
            # Bytes go out in one write with the head; a file slice by sendfile after them.
            output = [head]
            if method != "HEAD":
                for part in reply.body:
                    if isinstance(part, FileSlice):
                        self.h11.send_with_data_passthrough(h11.Data(data=cast(bytes, part)))
                        self._write(b"".join(output))
                        output.clear()
                        await self._send_file(part)
                    else:
                        output.append(self.h11.send(h11.Data(data=part)) or b"")
                        self._sent += len(part)
            output.append(self.h11.send(h11.EndOfMessage()) or b"")
            self._write(b"".join(output))
            await self._drain()
        except (ConnectionError, TimeoutError, RuntimeError):
            # The client went away or stopped reading: what was sent is logged below.
            self._abort()
        finally:
            reply.discard()
            elapsed = asyncio.get_running_loop().time() - started
            access.info(
                '%s - - [%s] "%s" %d %s %.4f',
                self.peer,
                _LogTime(),
                line,
                status,
                self._sent or "-",
                elapsed,
            )

    def _write(self, data: bytes | None) -> None:
        if data and self.transport is not None and not self._lost:
            self.transport.write(data)

    async def _drain(self) -> None:
        """Wait until the transport's buffer is below its mark, within the idle timeout."""
        if self._lost:
            raise ConnectionResetError("the client has gone")
        if not self._writing_paused:
            return
        self._writable = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(self.limits.idle_timeout):
            await self._writable
        if self._lost:
            raise ConnectionResetError("the client has gone")

    async def _send_file(self, part: FileSlice) -> None:
        """Send a slice of a file, in pieces each due within the idle timeout."""
        loop = asyncio.get_running_loop()
        transport = self.transport
        assert transport is not None
        offset, end = part.offset, part.offset + part.count
        while offset < end:
            count = min(end - offset, SENDFILE_PIECE)
            if self._lost:
                raise ConnectionResetError("the client has gone")
            if self.factory.copy_bodies:
                data = await loop.run_in_executor(None, os.pread, part.file.fileno(), count, offset)
                if not data:
                    raise RuntimeError("the file shrank while it was sent")
                self._write(data)
                await self._drain()
                offset += len(data)
                self._sent += len(data)
                continue
            try:
                async with asyncio.timeout(self.limits.idle_timeout):
                    done = await loop.sendfile(transport, part.file, offset, count)
            except NotImplementedError:
                self.factory.copy_bodies = True  # uvloop: no loop.sendfile
                continue
            if done == 0:
                raise RuntimeError("the file shrank while it was sent")
            offset += done
            self._sent += done

    # -- closing ---------------------------------------------------------------------

    def _abort(self) -> None:
        """Cut the connection with a reset: a body cut short must not end as if whole."""
        if self.transport is not None and not self._lost:
            reset(self.transport)

    def _close(self) -> None:
        """End the connection: say we are done, then wait briefly for the client to go."""
        transport = self.transport
        if transport is None or self._lost or transport.is_closing():
            return
        self._lingering = True
        self._pending.clear()
        loop = asyncio.get_running_loop()
        if transport.can_write_eof() and not self._eof:
            transport.write_eof()
            if self._reading_paused:
                self._reading_paused = False
                transport.resume_reading()
            self._linger_timer = loop.call_later(LINGER, self._linger_end, loop.time())
        else:
            # Nothing to wait for (the client has ended, or TLS cannot half-close); the
            # timer resets a client that never reads the rest of the reply.
            transport.close()
            self._linger_timer = loop.call_later(self.limits.idle_timeout, transport.abort)

    def _linger_end(self, since: float) -> None:
        """Close once the reply has left; reset a client that has not read it in time."""
        self._linger_timer = None
        transport = self.transport
        if transport is None or self._lost:
            return
        if transport.get_write_buffer_size() == 0:
            transport.close()
        elif asyncio.get_running_loop().time() - since >= self.limits.idle_timeout:
            transport.abort()
        else:
            loop = asyncio.get_running_loop()
            self._linger_timer = loop.call_later(LINGER, self._linger_end, since)


def _head_size(request: h11.Request) -> int:
    """The size of the request line and headers as sent (give or take spaces)."""
    size = len(request.method) + len(request.target) + len(request.http_version) + 8
    return size + sum(len(name) + len(value) + 4 for name, value in request.headers)


def _discard_reply(job: asyncio.Future[Reply]) -> None:
    if not job.cancelled() and job.exception() is None:
        job.result().discard()
