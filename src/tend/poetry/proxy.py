"""The poetry proxy: fetch the poem from an upstream server once, serve it to every client.

The tutorial's poetry proxy (its exercises 2 and 4 ask for it as an app file and a
plugin). The first client starts one upstream fetch; clients that arrive while it is in
flight wait for that same fetch, so the upstream sees one connection however many clients
come; later clients get the cached poem at once.

Only a whole poem is cached. In the poetry protocol a clean end-of-file is the only sign
that a poem is whole, so an upstream that refuses, resets, times out, sends nothing or
sends more than the proxy will hold (``max_poem_bytes``) leaves nothing in the cache: the
failure is logged once with its reason, and every client waiting for that fetch is reset
(never sent part of a poem, never closed cleanly). The next fetch waits for a back-off,
half a second after the first failure in a row, doubling up to 30 s; a client that comes
meanwhile is reset at once, told when the next attempt will be, so that an upstream that
fails at once is not asked again for every client.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from tend import AccessLog, Service, arm_reset, host_and_port, reset
from tend.poetry.client import DEFAULT_TIMEOUT, PoetryError, get_poetry
from tend.poetry.server import WHOLE_POEM_LIMIT, Peer, PoemSender

log = logging.getLogger(__name__)
# The lines written per client connection: the cheap path into the same log.
access = AccessLog(__name__)

# The largest poem the proxy fetches and holds, unless told otherwise (--max-poem-bytes).
DEFAULT_MAX_PROXIED_BYTES = 4 * 1024 * 1024

# After a failed fetch, none before this many seconds; doubled with each failure in a row,
# up to RETRY_BACKOFF_MAX.
RETRY_BACKOFF = 0.5
RETRY_BACKOFF_MAX = 30.0


class ProxyService(Service):
    """Holds the poem fetched from *host*:*port*, fetching it when a client first asks.

    *timeout* bounds each upstream fetch, in seconds. *cache_ttl* is how long a fetched
    poem is served before the next client fetches it again: ``None`` keeps it for as long
    as the proxy runs (the tutorial's proxy), ``0`` never caches, though clients that
    arrive during a fetch still share it. A poem over *max_poem_bytes* fails the fetch.
    After a failed fetch the next waits *retry_backoff* seconds, doubled with each failure
    in a row up to *retry_backoff_max*.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        cache_ttl: float | None = None,
        max_poem_bytes: int = DEFAULT_MAX_PROXIED_BYTES,
        retry_backoff: float = RETRY_BACKOFF,
        retry_backoff_max: float = RETRY_BACKOFF_MAX,
    ) -> None:
        super().__init__()
        self.host = host
        self.port = port
        self.address = host_and_port(host, port)
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.max_poem_bytes = max_poem_bytes
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.poem: bytes | None = None
        self._cached_at = 0.0
        self._fetch: asyncio.Task[bytes] | None = None
        self._failures = 0  # in a row
        self._last_failure = ""
        self._next_attempt = 0.0  # loop time

    async def start_service(self) -> None:
        log.info("proxying poetry from %s", self.address)
        await super().start_service()

    async def stop_service(self) -> None:
        """Stop; a fetch still in flight is cancelled, and its waiting clients reset."""
        await super().stop_service()
        fetch = self._fetch
        if fetch is not None and not fetch.done():
            fetch.cancel()
            await asyncio.wait([fetch])

    def cached_poem(self) -> bytes | None:
        """The cached poem, or None if there is none or it has expired."""
        poem = self.poem
        if poem is not None and self.cache_ttl is not None:
            age = asyncio.get_running_loop().time() - self._cached_at
            if age >= self.cache_ttl:
                self.poem = poem = None
        return poem

    def backing_off(self) -> str | None:
        """Why a client that finds no poem cannot wait for one now, or None if it can.

        While the back-off after a failed fetch runs, and no fetch is in flight, there is
        nothing to wait for: the reason names the failure and when the next attempt is.
        """
        fetch = self._fetch
        if fetch is not None and not fetch.done():
            return None
        left = self._next_attempt - asyncio.get_running_loop().time()
        if left <= 0:
            return None
        times = "" if self._failures == 1 else f" ({self._failures} times in a row)"
        return (
            f"the last fetch from {self.address} failed{times}: {self._last_failure}; "
            f"the next attempt is in {left:.1f} s"
        )

    def get_poem(self, peer: object) -> asyncio.Future[bytes]:
        """The upstream fetch in flight for *peer* to wait on, started if there is none.

        The future fails with PoetryError if the fetch does, and is cancelled if the proxy
        stops first.
        """
        fetch = self._fetch
        if fetch is not None and not fetch.done():
            access.info("%s waits for the poem already on its way from %s", peer, self.address)
            return fetch
        log.info("proxying poem from %s for %s", self.address, peer)
        fetch = asyncio.get_running_loop().create_task(self._fetch_poem())
        # Added first, so it runs before any waiting client's callback.
        fetch.add_done_callback(self._fetched)
        self._fetch = fetch
        return fetch

    async def _fetch_poem(self) -> bytes:
        loop = asyncio.get_running_loop()
        started = loop.time()
        poem = await get_poetry(
            self.host, self.port, timeout=self.timeout, max_bytes=self.max_poem_bytes
        )
        log.info(
            "fetched %d bytes of poetry from %s in %.2f s",
            len(poem),
            self.address,
            loop.time() - started,
        )
        if self.cache_ttl != 0:
            self.poem = poem
            self._cached_at = loop.time()
        return poem

    def _fetched(self, fetch: asyncio.Task[bytes]) -> None:
        if fetch is self._fetch:
            self._fetch = None
        if fetch.cancelled():
            log.info("stopped fetching the poem from %s: the proxy is stopping", self.address)
            return
        error = fetch.exception()  # also marks it retrieved when no client waits any more
        if error is None:
            self._failures = 0
            self._next_attempt = 0.0
            return
        self._failures += 1
        backoff = min(self.retry_backoff * 2 ** min(self._failures - 1, 32), self.retry_backoff_max)
        self._next_attempt = asyncio.get_running_loop().time() + backoff
        if isinstance(error, PoetryError):
            self._last_failure = error.reason
            if error.reason.startswith("the poem is larger than"):
                self._last_failure += " (--max-poem-bytes)"
            log.warning(
                "cannot fetch poem from %s: %s; the next fetch in %.1f s",
                self.address,
                self._last_failure,
                backoff,
            )
        else:
            self._last_failure = f"{type(error).__name__}: {error}"
            log.error("error while fetching poem from %s", self.address, exc_info=error)


class PoetryProxyProtocol(PoemSender):
    """Serves the cached poem, or waits for the upstream fetch and serves that."""

    __slots__ = ("_client", "_waiting", "service")

    def __init__(self, service: ProxyService) -> None:
        super().__init__(WHOLE_POEM_LIMIT)
        self.service = service
        self._client: asyncio.WriteTransport | None = None
        self._waiting: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement WriteTransport without subclassing it.
        transport = cast(asyncio.WriteTransport, transport)
        # Armed at once: a proxy that dies while the client waits, or mid-poem, resets it.
        arm_reset(transport)
        poem = self.service.cached_poem()
        peer = Peer(transport.get_extra_info("peername"))
        if poem is not None:
            access.info("serving cached poem to %s", peer)
            self.send_poem(transport, poem)
            return
        refusal = self.service.backing_off()
        if refusal is not None:
            access.info("resetting the connection to %s: %s", peer, refusal)
            reset(transport)
            return
        self._client = transport
        self._waiting = self.service.get_poem(peer)
        self._waiting.add_done_callback(self._poem_arrived)

    def _poem_arrived(self, fetch: asyncio.Future[bytes]) -> None:
        self._waiting = None
        transport = self._client
        self._client = None
        if transport is None or transport.is_closing():
            return
        peer = Peer(transport.get_extra_info("peername"))
        if fetch.cancelled() or fetch.exception() is not None:
            # Reset, not close: a clean end-of-file would tell the client "that was all".
            access.info("resetting the connection to %s: there is no poem to send", peer)
            reset(transport)
            return
        poem = fetch.result()
        access.info("sending %d bytes of poetry to %s", len(poem), peer)
        self.send_poem(transport, poem)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiting is not None:
            # Leaving costs nothing more: the fetch goes on for the others and the cache.
            self._waiting.remove_done_callback(self._poem_arrived)
            self._waiting = None
            if self._client is not None:
                access.info(
                    "%s left before the poem arrived",
                    Peer(self._client.get_extra_info("peername")),
                )
        self._client = None
        super().connection_lost(exc)


class PoetryProxyFactory:
    """Makes a PoetryProxyProtocol per connection, all sharing one ProxyService."""

    def __init__(self, service: ProxyService) -> None:
        self.service = service

    def __call__(self) -> PoetryProxyProtocol:
        return PoetryProxyProtocol(self.service)
