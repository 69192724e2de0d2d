"""Socket addresses written as people read them: ``127.0.0.1:10000``, ``[::1]:10000``.

One way of writing an address for every message, status line and log line.
Makes no OS calls.
"""

from __future__ import annotations


def host_and_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets: ``[::1]:10000``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_address(address: object) -> str:
    """A socket address as ``getsockname``/``getpeername`` give it, written for people.

    An IP address (a tuple) is ``host:port``; a UNIX socket's is its path, ``@name`` for
    an abstract one, or ``unix socket`` when it has none (a client's, say).
    """
    if isinstance(address, tuple) and len(address) >= 2:
        return host_and_port(str(address[0]), int(address[1]))
    if isinstance(address, bytes):
        return "@" + address[1:].decode(errors="replace") if address else "unix socket"
    return str(address) or "unix socket"
