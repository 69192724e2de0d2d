"""The poetry client: ``get_poetry()`` for any asyncio program, and the ``get-poetry`` command.

In the poetry protocol the server sends one poem and closes the connection cleanly; that
end-of-file is the only sign that the poem is whole. So a connection reset, a timeout or
a refusal is an error here, never a short poem, and so is a server that sends nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tend import CommandParser, UsageError, host_and_port, positive_seconds, quote

DEFAULT_TIMEOUT = 10.0

_READ_SIZE = 64 * 1024


class PoetryError(Exception):
    """A fetch that did not end with a whole poem: refused, reset, timed out, or empty.

    ``address`` is ``HOST:PORT``, ``reason`` the lower-case reason, and ``received`` the
    bytes that arrived before the fetch failed (they are not a poem).
    """

    def __init__(self, address: str, reason: str, received: bytes = b"") -> None:
        super().__init__(f"cannot get poetry from {address}: {reason}")
        self.address = address
        self.reason = reason
        self.received = received


# `timeout=` is the documented way to bound a fetch (one number, as the command line has);
# inside, asyncio.timeout() enforces it, which is what ASYNC109 asks for.
async def get_poetry(
    host: str,
    port: int,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    max_bytes: int | None = None,
) -> bytes:
    """Fetch the poem served on *host*:*port*; *timeout* bounds the whole fetch, in seconds,
    and *max_bytes* the poem's size (more fails the fetch as soon as it arrives).

    Raises:
        PoetryError: the connection was refused, reset or timed out, no poetry came, or
            more than *max_bytes*.
    """
    address = host_and_port(host, port)
    chunks: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                while chunk := await reader.read(_READ_SIZE):
                    chunks.append(chunk)
                    received += len(chunk)
                    if max_bytes is not None and received > max_bytes:
                        raise PoetryError(
                            address,
                            f"the poem is larger than {max_bytes:,} bytes",
                            b"".join(chunks),
                        )
            finally:
                writer.close()
                # The error that ended the read (a reset) surfaces here again; it is handled.
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError as error:
        if error.errno is not None:  # the system gave up connecting, not our deadline
            raise PoetryError(address, _describe(error, received), b"".join(chunks)) from error
        raise PoetryError(
            address,
            f"timed out after {timeout:g} s ({_bytes(received)} received)",
            b"".join(chunks),
        ) from None
    except OSError as error:
        raise PoetryError(address, _describe(error, received), b"".join(chunks)) from error
    except (UnicodeError, ValueError) as error:  # a host the resolver cannot take
        raise PoetryError(address, f"invalid host {quote(host, 40)}: {error}") from error
    if not received:
        raise PoetryError(address, "the server closed the connection without sending poetry")
    return b"".join(chunks)


def _bytes(count: int) -> str:
    return "1 byte" if count == 1 else f"{count} bytes"


def _describe(error: OSError, received: int) -> str:
    """The reason an OS error ended a fetch, as the rest of a one-line message reads."""
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host: {error.strerror}"
    if isinstance(error, ConnectionResetError | BrokenPipeError):
        if received:
            return f"connection reset after {_bytes(received)}: the poem was cut short"
        return "connection reset before any poetry arrived"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if error.errno is not None:
        text = os.strerror(error.errno)
        return text[0].lower() + text[1:]
    # asyncio raises a bare OSError listing every address it tried; the first says enough.
    text = str(error)
    if text.startswith("Multiple exceptions: "):
        text = text.removeprefix("Multiple exceptions: ").split(", [Errno", 1)[0]
    return text


# -- the get-poetry command ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Server:
    """A server named on the command line, with its host as typed."""

    host: str
    port: int

    def __str__(self) -> str:
        return host_and_port(self.host, self.port)


def parse_address(text: str) -> Server:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT`` or a bare ``PORT`` (on localhost).

    The host must be an IP address (IPv6 in brackets) or a host name: IDNA-encodable,
    dot-separated labels of letters, digits and hyphens, at most 253 characters.

    Raises:
        argparse.ArgumentTypeError: the address, with what is wrong with it.
    """
    host, colon, port_text = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not colon:
        host = "localhost"
    elif bracketed:
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(
            f"invalid address {quote(text)}: write an IPv6 host in brackets, as [::1]:10000"
        )
    if not host or not (port_text.isascii() and port_text.isdigit()):
        raise argparse.ArgumentTypeError(
            f"invalid address {quote(text)}: expected HOST:PORT or a port number"
        )
    if len(port_text) > 5 or not 0 < int(port_text) < 65536:
        raise argparse.ArgumentTypeError(
            f"invalid address {quote(text)}: the port must be a number from 1 to 65535"
        )
    port = int(port_text)
    problem = _host_problem(host, bracketed)
    if problem is not None:
        raise argparse.ArgumentTypeError(
            f"invalid address {quote(text, 32)}: {quote(host, 30)} {problem}"
        )
    return Server(host, port)


# A label of a host name, once IDNA-encoded: letters, digits and inner hyphens, 1 to 63.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _host_problem(host: str, bracketed: bool) -> str | None:
    """What is wrong with *host* (as the rest of a sentence), or None if it is fine."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if bracketed:
        if address is None or address.version != 6:
            return "is not an IPv6 address: brackets are for IPv6 addresses only"
        return None
    if address is not None:
        return None
    if len(host) > 253:
        return "is longer than 253 characters"
    not_a_name = "is not a host name (letters, digits and hyphens) or an IP address"
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        return not_a_name
    labels = encoded.removesuffix(".").split(".")
    if not all(_LABEL.fullmatch(label) for label in labels) or len(encoded) > 253:
        return not_a_name
    if labels[-1].isdigit():  # no top-level domain is all digits: a mistyped IP address
        return "is not a valid IP address"
    return None


def command_parser() -> argparse.ArgumentParser:
    """The parser for ``get-poetry``."""
    parser = CommandParser(
        prog="get-poetry",
        description="Fetch poems from poetry servers, all at once. Poems go to standard "
        "output (or to DIR/HOST_PORT.txt), one summary line per server to standard error.",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="give up on a server after S seconds (default: %(default)g)",
    )
    parser.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write each poem to DIR/HOST_PORT.txt instead of standard output",
    )
    parser.add_argument(
        "servers",
        nargs="+",
        type=parse_address,
        metavar="HOST:PORT",
        help="a poetry server; a bare PORT means localhost",
    )
    return parser


@dataclass(slots=True)
class _Outcome:
    poem: bytes | None = None
    failed: bool = False


async def fetch_all(
    servers: Sequence[Server], time_limit: float, output_dir: str | None
) -> list[_Outcome]:
    """Fetch from every server at once, reporting each as it finishes; return the outcomes."""
    outcomes = [_Outcome() for _ in servers]
    async with asyncio.TaskGroup() as group:
        for number, server in enumerate(servers, start=1):
            group.create_task(_fetch_one(number, server, time_limit, output_dir, outcomes))
    return outcomes


async def _fetch_one(
    number: int,
    server: Server,
    time_limit: float,
    output_dir: str | None,
    outcomes: list[_Outcome],
) -> None:
    outcome = outcomes[number - 1]
    started = time.monotonic()
    try:
        poem = await get_poetry(server.host, server.port, timeout=time_limit)
    except PoetryError as error:
        outcome.failed = True
        _report(f"Task {number}: failed to get poetry from {server}: {error.reason}")
        return
    except Exception as error:  # a bug, not the server's fault: still one line, no traceback
        outcome.failed = True
        _report(
            f"Task {number}: failed to get poetry from {server}: "
            f"{type(error).__name__}: {quote(error)}"
        )
        return
    elapsed = time.monotonic() - started
    if output_dir is not None:
        path = os.path.join(output_dir, f"{server.host}_{server.port}.txt")
        try:
            await asyncio.to_thread(_write_file, path, poem)
        except OSError as error:
            outcome.failed = True
            _report(f"Task {number}: cannot write {quote(path)}: {error.strerror}")
            return
    else:
        outcome.poem = poem
    _report(f"Task {number}: {len(poem)} bytes of poetry from {server} in {elapsed:.2f} s")


def make_folders(path: str) -> None:
    """Create the folder *path* and its missing parents; if that fails, remove the ones
    this call created, so that a failure leaves nothing new behind.

    Raises:
        OSError: a folder could not be created (a name too long, no permission, ...).
    """
    missing = []
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    created: list[str] = []
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                if not os.path.isdir(folder):
                    raise
                continue  # made by someone else meanwhile: not ours to remove
            created.append(folder)
    except OSError:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def _write_file(path: str, poem: bytes) -> None:
    with open(path, "wb") as file:
        file.write(poem)


def _report(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``get-poetry``; return 0 if every fetch succeeded, 1 if any failed."""
    try:
        arguments = command_parser().parse_args(argv)
    except UsageError as error:
        _report(f"{error.prog}: {error}")
        _report(error.hint or "try `get-poetry --help`")
        return 2
    output_dir: str | None = arguments.output_dir
    if output_dir is not None:
        try:
            make_folders(output_dir)
        except OSError as error:
            _report(
                f"get-poetry: cannot create output directory {quote(output_dir)}: {error.strerror}"
            )
            return 1
    try:
        outcomes = asyncio.run(fetch_all(arguments.servers, arguments.timeout, output_dir))
    except KeyboardInterrupt:
        return 130
    try:
        for outcome in outcomes:
            if outcome.poem is not None:
                sys.stdout.buffer.write(outcome.poem)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (as `| head` does); say nothing more, and keep Python's exit quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 1 if any(outcome.failed for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
