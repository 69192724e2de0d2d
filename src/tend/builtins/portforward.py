"""``tend portforward``: relay every connection made to ``--listen`` to ``--connect``.

The upstream is ``HOST:PORT`` or an endpoint description (``tcp:host=H:port=P``,
``unix:PATH``), connected within a timeout for each client. With ``--proxy-protocol v1``
or ``v2`` the upstream first receives a PROXY protocol header (haproxy's spec) naming the
client, so that it can log and check the real client's address. The bytes go through the
shared relay: backpressure both ways and half-close passed on, which twistd's
portforward drops (``nc -N`` gets nothing back through it).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from tend import (
    AccessLog,
    Option,
    Service,
    ServiceMaker,
    StartupError,
    endpoint_text,
    host_and_port,
    parse_endpoint,
    positive_seconds,
    quote,
)
from tend.builtins.relay import (
    IDLE_TIMEOUT,
    IFACE,
    MAX_CONNECTIONS,
    RelayFactory,
    RelayProtocol,
    RelayService,
    UpstreamProtocol,
    given,
    number,
    open_tcp,
    open_unix,
    reason_of,
)

access = AccessLog(__name__)


@dataclass(frozen=True, slots=True)
class Target:
    """Where every connection goes: TCP *host* and *port*, or the UNIX socket at *path*."""

    host: str = ""
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else host_and_port(self.host, self.port)

    async def open(self) -> UpstreamProtocol:
        """Connect; a host name is resolved by the system at each connection."""
        if self.path is not None:
            return await open_unix(self.path)
        return await open_tcp(self.host, self.port)


_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?")
_EXPECTED = "expected HOST:PORT, [IPV6]:PORT, tcp:host=HOST:port=PORT or unix:PATH"


def parse_target(text: str) -> Target:
    """``--connect``: ``HOST:PORT``, ``[::1]:PORT``, a bare ``PORT`` (localhost),
    ``tcp:HOST:PORT``, ``tcp:host=HOST:port=PORT`` or ``unix:PATH`` (``unix:path=PATH``)."""
    if text.startswith("unix:"):
        path = text.removeprefix("unix:").removeprefix("path=")
        if not path or "\0" in path:
            raise argparse.ArgumentTypeError(f"invalid upstream {quote(text)}: {_EXPECTED}")
        # Absolute now: the daemon changes directory before it connects.
        return Target(path=os.path.abspath(path))
    if text.startswith("tcp:"):
        host, port = _tcp_fields(text)
    elif text.isascii() and text.isdigit():
        host, port = "localhost", text
    elif text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        host, port = (inside, rest[1:]) if bracket and rest.startswith(":") else ("", "")
    else:
        host, _, port = text.rpartition(":")
        if ":" in host:  # an IPv6 address without brackets: ambiguous
            host = ""
    return Target(_host(host, text), _port(port, text))


def _tcp_fields(text: str) -> tuple[str, str]:
    # Colons separate fields; a backslash escapes one, as in listening descriptions.
    fields = [field.replace("\\:", ":") for field in re.split(r"(?<!\\):", text)[1:]]
    named = dict(field.split("=", 1) for field in fields if "=" in field)
    plain = [field for field in fields if "=" not in field]
    if set(named) - {"host", "port"} or len(plain) + len(named) != 2:
        raise argparse.ArgumentTypeError(f"invalid upstream {quote(text)}: {_EXPECTED}")
    host = named.get("host") or (plain.pop(0) if plain else "")
    port = named.get("port") or (plain.pop(0) if plain else "")
    return host, port


def _host(host: str, text: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _NAME.fullmatch(host):
        raise argparse.ArgumentTypeError(f"invalid upstream {quote(text)}: {_EXPECTED}")
    return host


def _port(port: str, text: str) -> int:
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(
            f"invalid upstream {quote(text)}: the port must be a number from 1 to 65535"
        )
    return int(port)


# -- the PROXY protocol (haproxy's proxy-protocol.txt) ----------------------------------

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_header(version: str, client: object, local: object) -> bytes:
    """The PROXY protocol *version* (``v1`` or ``v2``) header for a client connection.

    *client* and *local* are the connection's peer and own addresses as the socket gives
    them; a connection that is not TCP (a UNIX socket's) is sent as unknown (v1) or
    LOCAL (v2), which tells the upstream to use the connection's own addresses.
    """
    source = _ip_and_port(client)
    destination = _ip_and_port(local)
    if source is None or destination is None or source[0].version != destination[0].version:
        if version == "v1":
            return b"PROXY UNKNOWN\r\n"
        return PROXY_V2_SIGNATURE + bytes((0x20, 0x00, 0, 0))
    (source_ip, source_port), (destination_ip, destination_port) = source, destination
    if version == "v1":
        family = "TCP4" if source_ip.version == 4 else "TCP6"
        line = f"PROXY {family} {source_ip} {destination_ip} {source_port} {destination_port}\r\n"
        return line.encode("ascii")
    addresses = (
        source_ip.packed
        + destination_ip.packed
        + source_port.to_bytes(2, "big")
        + destination_port.to_bytes(2, "big")
    )
    family_byte = 0x11 if source_ip.version == 4 else 0x21  # TCP over IPv4, over IPv6
    return (
        PROXY_V2_SIGNATURE
        + bytes((0x21, family_byte))
        + len(addresses).to_bytes(2, "big")
        + addresses
    )


def _ip_and_port(
    address: object,
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    if not (isinstance(address, tuple) and len(address) >= 2):
        return None
    try:
        return ipaddress.ip_address(str(address[0]).split("%")[0]), int(address[1])
    except ValueError:
        return None


# -- the service and the plugin ---------------------------------------------------------


class ForwardProtocol(RelayProtocol):
    """One client: connect to the target at once, then relay."""

    def __init__(self, service: PortForwardService) -> None:
        super().__init__(service)
        self.forward = service

    def describe(self) -> str:
        return f"{self.peer} to {self.forward.target}"

    def accepted(self) -> None:
        self.connect(self.forward.target.open)

    def connected(self, upstream: UpstreamProtocol) -> bytes:
        version = self.forward.proxy_protocol
        if version is None:
            return b""
        assert self.transport is not None
        return proxy_header(
            version,
            self.transport.get_extra_info("peername"),
            self.transport.get_extra_info("sockname"),
        )

    def connect_failed(self, error: Exception) -> None:
        # A reset, not an end-of-file, so the client cannot take it for an empty answer.
        self.close_with(f"cannot connect: {reason_of(error)}", cut=True)


class PortForwardService(RelayService):
    """The forwarder: its listeners, its target, its limits."""

    def __init__(
        self,
        *,
        target: Target,
        proxy_protocol: str | None,
        connect_timeout: float,
        idle_timeout: float | None,
        max_connections: int,
    ) -> None:
        super().__init__(
            access=access,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout,
            exposure=f"it forwards whoever connects to {target}",
        )
        self.target = target
        self.proxy_protocol = proxy_protocol


class PortForwardFactory(RelayFactory):
    """Makes a ForwardProtocol for each client, all sharing one PortForwardService."""

    protocol = ForwardProtocol


class PortForwardMaker(ServiceMaker):
    name = "portforward"
    description = "A port forwarder: relays each connection on --listen to --connect."
    options = (
        Option(
            "listen",
            None,
            None,
            "An endpoint to listen on; a bare port listens on --iface.",
            type=endpoint_text,
            required=True,
            metavar="ENDPOINT",
            repeatable=True,
        ),
        Option(
            "connect",
            None,
            None,
            "Where to relay to: HOST:PORT, [IPV6]:PORT, tcp:host=HOST:port=PORT or unix:PATH.",
            type=parse_target,
            required=True,
            metavar="UPSTREAM",
        ),
        IFACE,
        Option(
            "proxy-protocol",
            None,
            None,
            "Send the upstream a PROXY protocol header (v1: text, v2: binary) naming the client.",
            choices=("v1", "v2"),
        ),
        Option(
            "connect-timeout",
            None,
            "10",
            "Give up connecting to the upstream after this many seconds.",
            type=positive_seconds,
            metavar="SECONDS",
        ),
        IDLE_TIMEOUT,
        MAX_CONNECTIONS,
    )

    def make_service(self, options: Mapping[str, object]) -> Service:
        target = options["connect"]
        if not isinstance(target, Target):
            target = parse_target(str(target))
        descriptions = given(options, "listen", str)
        for description in descriptions:
            if _reaches(parse_endpoint(description, str(options["iface"])), target):
                raise StartupError(
                    f"cannot forward {quote(description)} to {quote(str(target))}: "
                    "that is where it listens, so every connection would loop back to it"
                )
        version = options.get("proxy_protocol")
        service = PortForwardService(
            target=target,
            proxy_protocol=None if version in (None, "") else str(version),
            connect_timeout=number(options, "connect_timeout"),
            idle_timeout=number(options, "idle_timeout") or None,
            max_connections=int(number(options, "max_connections")),
        )
        service.listen_on(
            descriptions,
            PortForwardFactory(service),
            str(options["iface"]),
        )
        return service


def _reaches(endpoint: object, target: Target) -> bool:
    """Whether *target* is the listening *endpoint* itself (as far as the names tell)."""
    path = getattr(endpoint, "path", None)
    if path is not None:
        return target.path == str(path)
    port = getattr(endpoint, "port", None)
    if target.path is not None or port != target.port:
        return False
    interface = str(getattr(endpoint, "interface", ""))
    return target.host == interface or (_is_local(target.host) and _is_local(interface or "::"))


def _is_local(host: str) -> bool:
    """Whether *host* is loopback, the unspecified address (which reaches it), or localhost,
    however spelt: ``127.1``, ``0`` and ``2130706433`` are IPv4 addresses to the resolver
    (inet_aton's forms), ``::ffff:127.0.0.1`` is 127.0.0.1 to the kernel."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


service_maker = PortForwardMaker()
