"""The poetry protocol and the service that holds the poem (the seed's FastPoetry 2.0)."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from tend import Service, StartupError

log = logging.getLogger(__name__)


class Peer:
    """A peer address that is formatted only if a log record is actually written."""

    __slots__ = ("address",)

    def __init__(self, address: object) -> None:
        self.address = address

    def __str__(self) -> str:
        address = self.address
        if isinstance(address, tuple) and len(address) >= 2:
            host = f"[{address[0]}]" if ":" in str(address[0]) else address[0]
            return f"{host}:{address[1]}"
        return str(address) or "unix socket"


class PoetryService(Service):
    """Holds the poem; loads it when started (the seed's PoetryService)."""

    def __init__(self, poetry_file: str) -> None:
        super().__init__()
        self.poetry_file = poetry_file
        self.poem = b""

    async def start_service(self) -> None:
        """Read the poem, failing the start with one clear line if it cannot be read."""
        try:
            self.poem = await asyncio.to_thread(_read, self.poetry_file)
        except OSError as error:
            raise StartupError(
                f"cannot read poem file {self.poetry_file!r}: {error.strerror}"
            ) from None
        log.info("loaded a poem from: %s", self.poetry_file)
        await super().start_service()


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


class PoetryProtocol(asyncio.Protocol):
    """Sends the whole poem to each client, then closes (the seed's PoetryProtocol)."""

    def __init__(self, service: PoetryService) -> None:
        self.service = service

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement WriteTransport without subclassing it.
        transport = cast(asyncio.WriteTransport, transport)
        poem = self.service.poem
        log.info(
            "sending %d bytes of poetry to %s",
            len(poem),
            Peer(transport.get_extra_info("peername")),
        )
        transport.write(poem)
        transport.close()


class PoetryFactory:
    """Makes a PoetryProtocol per connection, all sharing one service's poem."""

    def __init__(self, service: PoetryService) -> None:
        self.service = service

    def __call__(self) -> PoetryProtocol:
        return PoetryProtocol(self.service)
