"""Slow poetry: the poem in small pieces with a pause between them (the tutorial's slow server).

For testing clients and proxies against a server that takes its time:
``tend poetry --chunk-size 10 --delay 0.1``. Each connection costs a protocol object and,
between pieces, one timer; no task, no thread, no copy of the poem.
"""

from __future__ import annotations

import asyncio
import logging

from tend.poetry.server import PoemSender, PoetryService, announce

log = logging.getLogger(__name__)

# The tutorial's slow server sent 10 bytes every 0.1 s.
DEFAULT_CHUNK_SIZE = 10


class SlowPoetryProtocol(PoemSender):
    """Sends the service's poem *chunk_size* bytes at a time, *delay* seconds apart."""

    __slots__ = ("service",)

    def __init__(self, service: PoetryService, chunk_size: int, delay: float) -> None:
        super().__init__(chunk_size, delay)
        self.service = service

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.send_poem(*announce(self.service, transport))


class SlowPoetryFactory:
    """Makes a SlowPoetryProtocol per connection, all sharing one service's poem."""

    def __init__(
        self, service: PoetryService, chunk_size: int = DEFAULT_CHUNK_SIZE, delay: float = 0.0
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
        if not delay >= 0:
            raise ValueError(f"delay must be zero or more seconds, not {delay}")
        self.service = service
        self.chunk_size = chunk_size
        self.delay = delay

    def __call__(self) -> SlowPoetryProtocol:
        return SlowPoetryProtocol(self.service, self.chunk_size, self.delay)
