"""What several built-ins share that is not relaying: an option type for whole numbers,
and the warning for a listener other hosts can reach. Built only on tend's public API."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable

from tend import StreamServer, format_address, quote


def whole_number(low: int, high: int, what: str) -> Callable[[str], int]:
    """An option type: a whole number from *low* to *high* in ASCII digits, a mistake
    named as the *what* it is (``invalid count '0': expected ...``)."""

    def convert(text: str) -> int:
        if not (text.isascii() and text.isdigit() and low <= int(text) <= high):
            raise argparse.ArgumentTypeError(
                f"invalid {what} {quote(text)}: expected a whole number from {low} to {high}"
            )
        return int(text)

    convert.__name__ = what.replace(" ", "_")
    return convert


def warn_if_exposed(server: StreamServer, exposure: str, logger: logging.Logger) -> None:
    """Once bound, warn once for each of *server*'s sockets that other hosts can reach
    (not loopback, IPv4-mapped loopback included), whatever the endpoint (``systemd:``
    too): ``listening on ADDRESS, which other hosts can reach: EXPOSURE``, on the plugin's
    *logger*."""
    listening = server.listening
    if listening is None or listening.closed:
        return
    # Any copy shows the addresses; one a dead worker's restart waits for may be empty.
    for sock in next((copy for copy in listening.copies if copy), []):
        with contextlib.suppress(OSError, ValueError, IndexError):  # never fail a start
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = sock.getsockname()
            ip = ipaddress.ip_address(address[0].split("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not ip.is_loopback:
                logger.warning(
                    "listening on %s, which other hosts can reach: %s",
                    format_address(address),
                    exposure,
                )
