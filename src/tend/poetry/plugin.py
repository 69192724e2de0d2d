"""The poetry plugins: ``tend poetry`` (the seed's Fast Poetry 3.0) and ``tend poetry-proxy``.

``tend poetry --port 10000 --poem FILE`` serves a poem, all at once, or slowly with
``--chunk-size N --delay SECONDS``. ``tend poetry-proxy --server HOST:PORT`` serves the
poem it fetches from another poetry server, fetching it once for every client.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from tend import (
    EndpointSyntaxError,
    MultiService,
    Option,
    Service,
    ServiceMaker,
    StreamServer,
    parse_endpoint,
    positive_seconds,
    quote,
    seconds,
)
from tend.poetry import DEFAULT_POEM
from tend.poetry.client import DEFAULT_TIMEOUT, Server, parse_address
from tend.poetry.proxy import DEFAULT_MAX_PROXIED_BYTES, PoetryProxyFactory, ProxyService
from tend.poetry.server import DEFAULT_MAX_POEM_BYTES, PoetryFactory, PoetryService
from tend.poetry.slow import DEFAULT_CHUNK_SIZE, SlowPoetryFactory


def parse_port(text: str) -> str:
    """Accept a port number or an endpoint description, as ``--port`` does."""
    try:
        parse_endpoint(text)
    except EndpointSyntaxError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def chunk_size(text: str) -> int:
    """A piece size in bytes, at least 1, for ``--chunk-size``."""
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(
            f"invalid chunk size {quote(text)}: expected a whole number of bytes, at least 1"
        )
    return int(text)


def byte_count(text: str) -> int:
    """A size in bytes, at least 1, for ``--max-poem-bytes``."""
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(
            f"invalid size {quote(text)}: expected a whole number of bytes, at least 1"
        )
    return int(text)


class PoetryMaker(ServiceMaker):
    name = "poetry"
    description = "A fast poetry service."
    options = (
        Option("port", "p", "10000", "The port number or endpoint to listen on.", type=parse_port),
        Option("iface", None, "localhost", "The interface to listen on."),
        Option("poem", None, DEFAULT_POEM, "The file containing the poem.", path=True),
        Option(
            "chunk-size",
            None,
            None,
            "Send the poem in pieces of this many bytes (10 if only --delay is given).",
            type=chunk_size,
        ),
        Option(
            "delay",
            None,
            None,
            "Pause this many seconds between pieces, as the tutorial's slow server does.",
            type=seconds,
        ),
        Option(
            "max-poem-bytes",
            None,
            str(DEFAULT_MAX_POEM_BYTES),
            "The largest poem file to read, in bytes (16 MiB); the poem must be a regular file.",
            type=byte_count,
        ),
    )

    def make_service(self, options: Mapping[str, object]) -> Service:
        top_service = MultiService()
        poetry_service = PoetryService(
            str(options["poem"]),
            int(_number(options.get("max_poem_bytes")) or DEFAULT_MAX_POEM_BYTES),
        )
        poetry_service.set_service_parent(top_service)
        size = _number(options.get("chunk_size"))
        delay = _number(options.get("delay"))
        factory: PoetryFactory | SlowPoetryFactory
        if size is None and delay is None:
            factory = PoetryFactory(poetry_service)
        else:
            # Pieces with no pause (--chunk-size alone) still wait for a slow reader.
            factory = SlowPoetryFactory(
                poetry_service,
                DEFAULT_CHUNK_SIZE if size is None else int(size),
                delay or 0.0,
            )
        # Armed: every protocol here ends with close_cleanly or a reset (see server.py).
        listener = StreamServer(
            str(options["port"]), factory, default_interface=str(options["iface"]), armed=True
        )
        listener.set_service_parent(top_service)
        return top_service


class PoetryProxyMaker(ServiceMaker):
    name = "poetry-proxy"
    description = "A poetry proxy: fetches a poem from another server once, serves it to all."
    options = (
        Option("port", "p", "10001", "The port number or endpoint to listen on.", type=parse_port),
        Option("iface", None, "localhost", "The interface to listen on."),
        Option(
            "server",
            None,
            None,
            "The upstream poetry server, as HOST:PORT (a bare PORT means localhost).",
            type=parse_address,
            required=True,
        ),
        Option(
            "timeout",
            None,
            str(DEFAULT_TIMEOUT),
            "Give up on an upstream fetch after this many seconds.",
            type=positive_seconds,
        ),
        Option(
            "cache-ttl",
            None,
            None,
            "Fetch the poem again once it is this many seconds old; 0 disables the cache. "
            "None: keep it for as long as the proxy runs.",
            type=seconds,
        ),
        Option(
            "max-poem-bytes",
            None,
            str(DEFAULT_MAX_PROXIED_BYTES),
            "The largest poem to fetch and hold, in bytes (4 MiB); over it the fetch fails "
            "and its waiting clients are reset.",
            type=byte_count,
        ),
    )

    def make_service(self, options: Mapping[str, object]) -> Service:
        server = options["server"]
        if not isinstance(server, Server):
            server = parse_address(str(server))
        timeout = _number(options.get("timeout"))
        top_service = MultiService()
        proxy_service = ProxyService(
            server.host,
            server.port,
            timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
            cache_ttl=_number(options.get("cache_ttl")),
            max_poem_bytes=int(_number(options.get("max_poem_bytes")) or DEFAULT_MAX_PROXIED_BYTES),
        )
        proxy_service.set_service_parent(top_service)
        listener = StreamServer(
            str(options["port"]),
            PoetryProxyFactory(proxy_service),
            default_interface=str(options["iface"]),
            armed=True,
        )
        listener.set_service_parent(top_service)
        return top_service


def _number(value: object) -> float | None:
    """An option's converted number, or None if it was not given."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    return float(str(value))


service_maker = PoetryMaker()
proxy_service_maker = PoetryProxyMaker()
