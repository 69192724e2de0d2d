"""The poetry protocol and the service that holds the poem (the seed's FastPoetry 2.0).

A poem goes out in one write and the connection closes: the clean end-of-file is how a
client knows the poem is whole. So every connection is armed to end in a reset
(`tend.arm_reset`) from the moment it is made, and disarmed only by the clean close once
the whole poem has left the process (`tend.close_cleanly`): a server killed mid-poem,
even by SIGKILL or the OOM killer, cuts its clients off with a reset, never a clean short
poem. A poem larger than the transport's high-water mark goes out a piece at a time
instead (see :class:`PoemSender`), so that a client that never reads holds one piece of
the server's memory rather than a copy of the whole poem.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from tend import (
    AccessLog,
    Service,
    StartupError,
    arm_reset,
    close_cleanly,
    format_address,
    quote,
    read_file,
)

log = logging.getLogger(__name__)
# The lines written per connection: the cheap path into the same log, at the same level.
access = AccessLog(__name__)

# The largest poem the server reads, unless told otherwise (--max-poem-bytes).
DEFAULT_MAX_POEM_BYTES = 16 * 1024 * 1024

# asyncio's default high-water mark: a poem up to this size is written at once, since the
# transport would hold no more than this for a client that does not read anyway.
WHOLE_POEM_LIMIT = 64 * 1024


class Peer:
    """A peer address that is formatted only if a log line is actually written."""

    __slots__ = ("address",)

    def __init__(self, address: object) -> None:
        self.address = address

    def __str__(self) -> str:
        if self.address is None:  # it reset before it was accepted: it has no address left
            return "a client already gone"
        return format_address(self.address)


class PoetryService(Service):
    """Holds the poem; loads it when started (the seed's PoetryService).

    The poem file must be a regular file of at most *max_poem_bytes*: a FIFO would make
    the start wait for ever, and ``/dev/zero`` would be read until memory ran out.
    """

    def __init__(self, poetry_file: str, max_poem_bytes: int = DEFAULT_MAX_POEM_BYTES) -> None:
        super().__init__()
        self.poetry_file = poetry_file
        self.max_poem_bytes = max_poem_bytes
        self.poem = b""

    async def start_service(self) -> None:
        """Read the poem, failing the start with one clear line if it cannot be read.

        Raises:
            StartupError: the file cannot be read, is not a regular file, is too large, or
                is empty (every client would get nothing, which no client takes for a poem).
        """
        self.poem = await asyncio.to_thread(
            read_file,
            self.poetry_file,
            "poem file",
            self.max_poem_bytes,
            hint="; raise it with --max-poem-bytes",
        )
        if not self.poem:
            raise StartupError(f"cannot serve poem file {quote(self.poetry_file)}: it is empty")
        log.info("loaded a poem from: %s", self.poetry_file)
        await super().start_service()


def announce(
    service: PoetryService, transport: asyncio.BaseTransport
) -> tuple[asyncio.WriteTransport, bytes]:
    """Arm the reset and log the seed's line for a new client; return the transport to
    write to and the poem."""
    arm_reset(transport)
    poem = service.poem
    access.info(
        "sending %d bytes of poetry to %s", len(poem), Peer(transport.get_extra_info("peername"))
    )
    # uvloop's transports implement WriteTransport without subclassing it.
    return cast(asyncio.WriteTransport, transport), poem


class PoetryProtocol(asyncio.Protocol):
    """Sends the whole poem to each client, then closes (the seed's PoetryProtocol)."""

    __slots__ = ("service",)

    def __init__(self, service: PoetryService) -> None:
        self.service = service

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer, poem = announce(self.service, transport)
        writer.write(poem)
        close_cleanly(writer)


class PoemSender(asyncio.Protocol):
    """Sends a poem in pieces, *delay* seconds apart, never writing while the transport is full.

    The transport calls :meth:`pause_writing` when its buffer passes the high-water mark
    and :meth:`resume_writing` once it drains; in between nothing is written, so a client
    that stops reading costs at most one piece plus that mark. A connection that ends
    before the poem does is logged once, and its pending timer is cancelled: it costs
    nothing more.
    """

    __slots__ = ("_chunk_size", "_delay", "_paused", "_poem", "_sent", "_timer", "_transport")

    def __init__(self, chunk_size: int, delay: float = 0.0) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
        self._chunk_size = chunk_size
        self._delay = delay
        self._transport: asyncio.WriteTransport | None = None
        self._poem = b""
        self._sent = 0
        self._paused = False
        self._timer: asyncio.Handle | None = None  # the next _send_more, when one is due

    def send_poem(self, transport: asyncio.WriteTransport, poem: bytes) -> None:
        """Start sending *poem* on *transport*; the connection closes after the last piece.

        The connection should already be armed with `tend.arm_reset`, when it was made.
        """
        self._transport = transport
        self._poem = poem
        self._send_more()

    def _send_more(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        poem = self._poem
        size = len(poem)
        while self._sent < size:
            if self._paused:
                return  # resume_writing carries on
            if transport.is_closing():
                return  # a write failed (the client reset): the rest has nowhere to go
            end = self._sent + self._chunk_size
            transport.write(poem[self._sent : end])
            self._sent = min(end, size)
            if self._delay and self._sent < size:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._delay, self._send_more)
                return
        close_cleanly(transport)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._timer is None:  # else the pause between pieces is still running
            # Soon, not now: asyncio (3.11) ends a connection twice if it is closed from
            # resume_writing with its buffer empty, as the last piece may leave it.
            self._timer = asyncio.get_running_loop().call_soon(self._send_more)

    def eof_received(self) -> bool | None:
        # A poetry client sends nothing, so its end-of-file means it has gone: stop at once
        # rather than push the rest of the poem at a closed socket.
        if self._transport is not None and self._sent < len(self._poem):
            self._transport.abort()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        self._transport = None
        size = len(self._poem)
        self._poem = b""
        if transport is not None and self._sent < size:
            access.info(
                "connection to %s closed after %d of %d bytes of poetry%s",
                Peer(transport.get_extra_info("peername")),
                self._sent,
                size,
                f": {exc}" if exc is not None else "",
            )


class LargePoetryProtocol(PoemSender):
    """Sends a poem too large for one write as fast as the client reads it."""

    __slots__ = ("service",)

    def __init__(self, service: PoetryService) -> None:
        super().__init__(WHOLE_POEM_LIMIT)
        self.service = service

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.send_poem(*announce(self.service, transport))


class PoetryFactory:
    """Makes a protocol per connection, all sharing one service's poem."""

    def __init__(self, service: PoetryService) -> None:
        self.service = service

    def __call__(self) -> asyncio.Protocol:
        if len(self.service.poem) <= WHOLE_POEM_LIMIT:
            return PoetryProtocol(self.service)
        return LargePoetryProtocol(self.service)
