"""A bare asyncio poetry server: the floor that tend's own overhead is measured against.

Does the poetry server's work and nothing else: for each connection, write the poem
and close. With ``--loop uvloop`` it runs on uvloop; with ``--log FILE`` it also
writes the poetry server's per-connection line (``sending %d bytes of poetry to %s``)
through a default ``logging.FileHandler``, the cheapest way the standard library
offers to log it. Prints the bound port on standard output, then serves until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast

log = logging.getLogger("bare_server")


class PoetryProtocol(asyncio.Protocol):
    """Write the poem to each new connection, then close it."""

    def __init__(self, poem: bytes, logs: bool) -> None:
        self.poem = poem
        self.logs = logs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not derive from
        # asyncio.WriteTransport, though they have its methods.
        transport = cast(asyncio.WriteTransport, transport)
        if self.logs:
            log.info(
                "sending %d bytes of poetry to %s",
                len(self.poem),
                transport.get_extra_info("peername"),
            )
        transport.write(self.poem)
        transport.close()


async def serve(args: argparse.Namespace, poem: bytes) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logs = args.log is not None
    server = await loop.create_server(
        lambda: PoetryProtocol(poem, logs), args.iface, args.port, backlog=args.backlog
    )
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    async with server:
        await stop.wait()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any)")
    parser.add_argument("--iface", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--poem", type=Path, required=True, help="the file holding the poem")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--log", type=Path, help="log each connection to this file")
    parser.add_argument("--backlog", type=int, default=1024, help="listen backlog")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    poem = args.poem.read_bytes()
    if args.log is not None:
        log.addHandler(logging.FileHandler(args.log))
        log.setLevel(logging.INFO)
        log.propagate = False
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args, poem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
