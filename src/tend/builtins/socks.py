"""``tend socks``: a SOCKS4, 4a and 5 proxy that relays only where it is told it may.

CONNECT only (RFC 1928; user and password per RFC 1929, compared in constant time, users
from ``--users FILE``). Nothing is allowed until ``--allow CIDR[:PORTS]`` or
``--allow-host SUFFIX[:PORTS]`` says so. Each address a name resolves to is checked, and
the proxy connects to an address it checked, never resolving the name again. An
IPv4-mapped IPv6 address is checked as the IPv4 address it is, and the unspecified
address (``0.0.0.0``, ``::``), which reaches the local host on Linux, as loopback. A
listed name leads only to public addresses unless ``--allow`` lists the address too, so a
name whose records point at loopback or a private network gets nowhere. With users
configured, SOCKS4 and 4a (which cannot carry a password) are refused. BIND and UDP
ASSOCIATE are refused with the codes for "command not supported".

twistd's socks is an open relay, speaks SOCKS4 only and never answers a SOCKS5 greeting.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import hmac
import ipaddress
import logging
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
    StreamServer,
    endpoint_text,
    format_address,
    host_and_port,
    positive_seconds,
    quote,
    read_file,
)
from tend.builtins.relay import (
    IDLE_TIMEOUT,
    IFACE,
    MAX_CONNECTIONS,
    OpenUpstream,
    Refusal,
    RelayFactory,
    RelayProtocol,
    RelayService,
    UpstreamProtocol,
    given,
    number,
    open_tcp,
    reason_of,
)

log = logging.getLogger(__name__)
access = AccessLog(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The longest handshake message: a SOCKS4a request with a 255-byte user id and name.
HANDSHAKE_LIMIT = 1024
# A users file is a list of names and passwords, not a database.
USERS_FILE_LIMIT = 1024 * 1024
# getaddrinfo runs in threads: this many lookups at once, the rest wait their turn.
CONCURRENT_LOOKUPS = 16

CONNECT = 1

# SOCKS5 reply codes (RFC 1928 section 6).
SUCCEEDED = 0
GENERAL_FAILURE = 1
NOT_ALLOWED = 2
NETWORK_UNREACHABLE = 3
HOST_UNREACHABLE = 4
CONNECTION_REFUSED = 5
COMMAND_NOT_SUPPORTED = 7
ADDRESS_TYPE_NOT_SUPPORTED = 8

# SOCKS4 reply codes.
GRANTED = 90
REJECTED = 91

NO_AUTHENTICATION = 0
USER_PASSWORD = 2
NO_ACCEPTABLE_METHOD = 0xFF


# -- the allow list ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ports:
    """Destination ports, as inclusive ranges; none means every port."""

    ranges: tuple[tuple[int, int], ...] = ()

    def allow(self, port: int) -> bool:
        return not self.ranges or any(low <= port <= high for low, high in self.ranges)


@dataclass(frozen=True, slots=True)
class NetworkRule:
    """``--allow``: addresses in *network*, on *ports*."""

    network: IPNetwork
    ports: Ports


@dataclass(frozen=True, slots=True)
class HostRule:
    """``--allow-host``: the name *suffix* and every name below it, on *ports*."""

    suffix: str
    ports: Ports

    def matches(self, name: str) -> bool:
        return name == self.suffix or name.endswith("." + self.suffix)


@dataclass(frozen=True, slots=True)
class Policy:
    """Where clients may connect: nowhere, until rules say so."""

    networks: tuple[NetworkRule, ...] = ()
    hosts: tuple[HostRule, ...] = ()

    def allows_address(self, address: IPAddress, port: int) -> bool:
        """Whether an ``--allow`` rule covers *address* (normalised) on *port*."""
        return any(address in rule.network and rule.ports.allow(port) for rule in self.networks)

    def lists_name(self, name: str, port: int) -> bool:
        """Whether an ``--allow-host`` rule covers the name *name* on *port*."""
        return any(rule.matches(name) and rule.ports.allow(port) for rule in self.hosts)

    def may_allow_name(self, name: str, port: int) -> bool:
        """Whether any address of *name* could be allowed: else it is not even looked up."""
        return self.lists_name(name, port) or any(rule.ports.allow(port) for rule in self.networks)

    def allows_resolved(self, name: str, address: IPAddress, port: int) -> bool:
        """Whether *address*, which *name* resolved to, may be reached on *port*.

        An ``--allow`` rule covering the address decides. A name listed by ``--allow-host``
        reaches public addresses only: a listed name whose records point at loopback, a
        private network or link-local (the cloud metadata address) is refused unless
        ``--allow`` lists that address too.
        """
        if self.allows_address(address, port):
            return True
        return address.is_global and self.lists_name(name, port)


def normalised(address: IPAddress) -> IPAddress:
    """*address* as the kernel will treat it: IPv4-mapped IPv6 as IPv4, unspecified as loopback."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified:
        # On Linux, connecting to 0.0.0.0 or :: reaches the local host.
        if isinstance(address, ipaddress.IPv4Address):
            return ipaddress.IPv4Address("127.0.0.1")
        return ipaddress.IPv6Address("::1")
    return address


_PORT = re.compile(r"[0-9]{1,5}")


def parse_ports(text: str, whole: str) -> Ports:
    """``80,443,8000-8100``; *whole* is the option's value, for the message."""
    ranges = []
    for part in text.split(","):
        low, dash, high = part.partition("-")
        high = high if dash else low
        if not (_PORT.fullmatch(low) and _PORT.fullmatch(high)):
            raise argparse.ArgumentTypeError(
                f"invalid ports in {quote(whole)}: expected ports like 80,443,8000-8100"
            )
        first, last = int(low), int(high)
        if not 1 <= first <= last <= 65535:
            raise argparse.ArgumentTypeError(
                f"invalid ports in {quote(whole)}: ports go from 1 to 65535, low to high"
            )
        ranges.append((first, last))
    return Ports(tuple(ranges))


def parse_network_rule(text: str) -> NetworkRule:
    """``CIDR[:PORTS]``: ``127.0.0.0/8``, ``10.1.2.3:22``, ``[::1]:8000-8100``, ``fd00::/8:443``.

    An IPv6 address with ports goes in brackets; a bare address means that one address.
    """
    network_text, ports_text = _split_network(text)
    try:
        network = ipaddress.ip_network(network_text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid address or network {quote(text)}: expected CIDR[:PORTS], "
            "as 127.0.0.0/8, 10.0.0.0/8:443 or [::1]:8000-8100"
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(
        ipaddress.IPv6Network("::ffff:0:0/96")
    ):
        # An IPv4-mapped network is the IPv4 network it maps, as addresses are normalised.
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    ports = Ports() if ports_text is None else parse_ports(ports_text, text)
    return NetworkRule(network, ports)


def _split_network(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket:
            return text, None  # ip_network refuses it, with the usual message
        prefix, colon, ports = rest.partition(":")
        if prefix and not prefix.startswith("/"):
            return text, None
        return inside + prefix, ports if colon else None
    if "/" in text:
        address, _, rest = text.partition("/")
        length, colon, ports = rest.partition(":")
        return f"{address}/{length}", ports if colon else None
    if text.count(":") == 1:
        address, _, ports = text.partition(":")
        return address, ports
    return text, None  # an IPv4 address alone, or an IPv6 one (ports need brackets)


_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def host_name(text: str) -> str | None:
    """*text* as a host name to match, lower case without a final dot; None if it is not one."""
    name = text.lower().removesuffix(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


def parse_host_rule(text: str) -> HostRule:
    """``SUFFIX[:PORTS]``: ``example.com`` (it and every name below it), ``localhost:8000``."""
    suffix_text, colon, ports_text = text.partition(":")
    name = host_name(suffix_text.removeprefix("*.").removeprefix("."))
    if name is None:
        raise argparse.ArgumentTypeError(
            f"invalid host name {quote(text)}: expected SUFFIX[:PORTS], as example.com or "
            "internal.example.com:443"
        )
    return HostRule(name, parse_ports(ports_text, text) if colon else Ports())


# -- users ------------------------------------------------------------------------------


class Users:
    """RFC 1929 users: names and the SHA-256 of their passwords, checked in constant time."""

    def __init__(self, passwords: Mapping[bytes, bytes]) -> None:
        self._digests = {name: _digest(password) for name, password in passwords.items()}

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, name: bytes, password: bytes) -> bool:
        """Whether *password* is *name*'s; as slow for an unknown name as for a known one."""
        expected = self._digests.get(name)
        matches = hmac.compare_digest(
            _digest(password), expected if expected is not None else _NOBODY
        )
        return matches and expected is not None


def _digest(password: bytes) -> bytes:
    # Equal lengths for compare_digest, whatever the passwords' lengths.
    return hashlib.sha256(password).digest()


_NOBODY = _digest(b"\0no such user\0")


def read_users(path: str) -> Users:
    """The users in the file at *path*: ``name:password`` lines; ``#`` starts a comment line.

    Raises:
        StartupError: the file cannot be read, is not a regular file, or a line is wrong;
            the message never shows a password.
    """
    data = read_file(path, "users file", USERS_FILE_LIMIT)
    shown = quote(path)
    passwords: dict[bytes, bytes] = {}
    for number_, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.removesuffix(b"\r")
        if not line.strip() or line.lstrip().startswith(b"#"):
            continue
        name, colon, password = line.partition(b":")
        where = f"cannot use users file {shown}: line {number_}"
        if not colon:
            raise StartupError(f"{where} has no ':'; write one name:password per line")
        if not (1 <= len(name) <= 255 and 1 <= len(password) <= 255):
            raise StartupError(
                f"{where}: the name and the password must each be 1 to 255 bytes (RFC 1929)"
            )
        if name in passwords:
            raise StartupError(
                f"{where}: user {quote(name.decode(errors='replace'))} is listed twice"
            )
        passwords[name] = password
    if not passwords:
        raise StartupError(
            f"cannot use users file {shown}: it lists no users; write one name:password per line"
        )
    try:
        if os.stat(path).st_mode & 0o077:
            log.warning(
                "users file %s can be read by other users; make it private: chmod 600 %s",
                shown,
                shown,
            )
    except OSError:
        pass
    return Users(passwords)


# -- the protocol -----------------------------------------------------------------------


class HandshakeError(Exception):
    """A handshake that is not SOCKS as the RFCs write it; closed without an answer."""


@dataclass(frozen=True, slots=True)
class Request:
    """Where a client asks to go: an *address*, or a *name* (bytes, as sent) to resolve."""

    version: int
    command: int
    port: int
    address: IPAddress | None = None
    name: bytes | None = None

    @property
    def kind(self) -> str:
        """``socks4``, ``socks4a`` or ``socks5``."""
        if self.version == 4:
            return "socks4" if self.name is None else "socks4a"
        return "socks5"


def parse_socks4(buffer: bytearray) -> tuple[Request, int] | None:
    """A SOCKS4 or 4a request and its length, or None until it is whole."""
    if len(buffer) < 9:
        return None
    command = buffer[1]
    port = int.from_bytes(buffer[2:4], "big")
    packed = bytes(buffer[4:8])
    user_end = _field_end(buffer, 8, "user id")
    if user_end is None:
        return None
    if packed[:3] == b"\0\0\0" and packed[3] != 0:  # 4a: 0.0.0.x then the name
        name_end = _field_end(buffer, user_end + 1, "host name")
        if name_end is None:
            return None
        name = bytes(buffer[user_end + 1 : name_end])
        return Request(4, command, port, name=name), name_end + 1
    return Request(4, command, port, address=ipaddress.IPv4Address(packed)), user_end + 1


def _field_end(buffer: bytearray, start: int, what: str) -> int | None:
    """Where the NUL ending a SOCKS4 field starting at *start* is, or None until it comes."""
    end = buffer.find(0, start)
    if end < 0:
        if len(buffer) - start > 255:
            raise HandshakeError(f"a {what} longer than 255 bytes")
        return None
    if end - start > 255:
        raise HandshakeError(f"a {what} longer than 255 bytes")
    return end


def parse_greeting(buffer: bytearray) -> tuple[bytes, int] | None:
    """A SOCKS5 greeting's methods and its length, or None until it is whole."""
    if len(buffer) < 2 or len(buffer) < 2 + buffer[1]:
        return None
    return bytes(buffer[2 : 2 + buffer[1]]), 2 + buffer[1]


def parse_login(buffer: bytearray) -> tuple[bytes, bytes, int] | None:
    """An RFC 1929 name, password and length, or None until it is whole."""
    if not buffer:
        return None
    if buffer[0] != 1:
        raise HandshakeError(f"user/password version {buffer[0]}, not 1")
    if len(buffer) < 2 or len(buffer) < 3 + buffer[1]:
        return None
    name_end = 2 + buffer[1]
    end = name_end + 1 + buffer[name_end]
    if len(buffer) < end:
        return None
    return bytes(buffer[2:name_end]), bytes(buffer[name_end + 1 : end]), end


class AddressTypeError(Exception):
    """A SOCKS5 request with an address type that is not 1, 3 or 4."""


def parse_request(buffer: bytearray) -> tuple[Request, int] | None:
    """A SOCKS5 request and its length, or None until it is whole."""
    if len(buffer) < 5:
        return None
    if buffer[0] != 5:
        raise HandshakeError(f"a request of version {buffer[0]}, not 5")
    command, kind = buffer[1], buffer[3]
    if kind == 1:
        end = 4 + 4
    elif kind == 4:
        end = 4 + 16
    elif kind == 3:
        end = 5 + buffer[4]
    else:
        raise AddressTypeError(f"address type {kind}")
    if len(buffer) < end + 2:
        return None
    port = int.from_bytes(buffer[end : end + 2], "big")
    if kind == 3:
        return Request(5, command, port, name=bytes(buffer[5:end])), end + 2
    address = ipaddress.ip_address(bytes(buffer[4:end]))
    return Request(5, command, port, address=address), end + 2


def socks5_reply(code: int, bound: object = None) -> bytes:
    """A SOCKS5 reply; *bound* is the upstream socket's own address on success."""
    if isinstance(bound, tuple):
        address = ipaddress.ip_address(str(bound[0]).split("%")[0])
        kind = 1 if address.version == 4 else 4
        return bytes((5, code, 0, kind)) + address.packed + int(bound[1]).to_bytes(2, "big")
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


def socks4_reply(code: int) -> bytes:
    """A SOCKS4 reply (its port and address are ignored by clients for CONNECT)."""
    return bytes((0, code, 0, 0, 0, 0, 0, 0))


def code_for(error: Exception) -> int:
    """The SOCKS5 reply code for a failure to connect."""
    if isinstance(error, Refusal):
        return NOT_ALLOWED
    if isinstance(error, ConnectionRefusedError):
        return CONNECTION_REFUSED
    if isinstance(error, socket.gaierror | TimeoutError):
        return HOST_UNREACHABLE
    if isinstance(error, OSError) and error.errno == errno.ENETUNREACH:
        return NETWORK_UNREACHABLE
    if isinstance(error, OSError) and error.errno == errno.EHOSTUNREACH:
        return HOST_UNREACHABLE
    return GENERAL_FAILURE


GREETING, LOGIN, REQUEST, CONNECTING = range(4)


class SocksProtocol(RelayProtocol):
    """One client of the proxy: its handshake, the checks, then the relay."""

    what = "socks"

    def __init__(self, service: SocksService) -> None:
        super().__init__(service)
        self.socks = service
        self._stage = GREETING
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._request: Request | None = None
        self._user: str | None = None
        self._via = ""

    def describe(self) -> str:
        request = self._request
        who = self.peer if self._user is None else f"{self.peer} (user {self._user})"
        if request is None:
            version = {GREETING: "socks"}.get(self._stage, "socks5")
            return f"{version} {who}"
        target = host_and_port(_shown(request), request.port)
        return f"{request.kind} {who} to {target}{self._via}"

    def accepted(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(
            self.socks.handshake_timeout, self._too_slow
        )

    def closed(self) -> None:
        self._stop_timer()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        self.close_with(f"no whole handshake within {self.socks.handshake_timeout:g} s", cut=True)

    def handshake(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._advance()
        except HandshakeError as error:
            self.close_with(f"not a SOCKS handshake: {error}", cut=True)
            return
        if self._stage != CONNECTING and len(self._buffer) > HANDSHAKE_LIMIT:
            self.close_with(f"a handshake longer than {HANDSHAKE_LIMIT} bytes", cut=True)

    def _advance(self) -> None:
        """Take every whole message from the buffer, answering as each requires."""
        while self._buffer and self._stage != CONNECTING and not self._closing():
            if self._stage == GREETING:
                if self._buffer[0] == 4:
                    found = parse_socks4(self._buffer)
                    if found is None:
                        return
                    request, size = found
                    del self._buffer[:size]
                    self._decide(request)
                    return
                if self._buffer[0] != 5:
                    raise HandshakeError(f"version {self._buffer[0]}, neither 4 nor 5")
                greeting = parse_greeting(self._buffer)
                if greeting is None:
                    return
                methods, size = greeting
                del self._buffer[:size]
                self._choose(methods)
            elif self._stage == LOGIN:
                login = parse_login(self._buffer)
                if login is None:
                    return
                name, password, size = login
                del self._buffer[:size]
                self._log_in(name, password)
            else:
                try:
                    parsed = parse_request(self._buffer)
                except AddressTypeError as error:
                    self._refuse_v5(ADDRESS_TYPE_NOT_SUPPORTED, f"refused: {error}")
                    return
                if parsed is None:
                    return
                request, size = parsed
                del self._buffer[:size]
                self._decide(request)

    def _closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _choose(self, methods: bytes) -> None:
        wanted = USER_PASSWORD if self.socks.users is not None else NO_AUTHENTICATION
        if wanted not in methods:
            self._stage = REQUEST  # for the line's "socks5"
            self._write(bytes((5, NO_ACCEPTABLE_METHOD)))
            needed = "user and password" if wanted == USER_PASSWORD else "no authentication"
            self.close_with(f"refused: the client does not offer {needed}, the one method taken")
            return
        self._write(bytes((5, wanted)))
        self._stage = LOGIN if wanted == USER_PASSWORD else REQUEST

    def _log_in(self, name: bytes, password: bytes) -> None:
        users = self.socks.users
        assert users is not None
        shown = quote(name.decode(errors="replace"), 40)
        if not users.check(name, password):
            self._stage = REQUEST
            self._write(bytes((1, 1)))
            self.close_with(f"refused: wrong user name or password for {shown}")
            return
        self._user = shown
        self._write(bytes((1, 0)))
        self._stage = REQUEST

    def _decide(self, request: Request) -> None:
        """A whole request: refuse it, or check it and connect."""
        self._request = request
        self._stop_timer()
        socks = self.socks
        if request.version == 4 and socks.users is not None:
            self._refuse(request, "refused: SOCKS4 cannot carry a password, and users are set")
            return
        if request.command != CONNECT:
            command = {2: "BIND", 3: "UDP ASSOCIATE"}.get(request.command, str(request.command))
            self._refuse(request, f"refused: {command} is not supported", COMMAND_NOT_SUPPORTED)
            return
        if request.port == 0:
            self._refuse(request, "refused: port 0", NOT_ALLOWED)
            return
        address = request.address
        name = None
        if request.name is not None:
            text = request.name.decode("ascii", errors="replace")
            try:
                address = ipaddress.ip_address(text)  # an address written as text
            except ValueError:
                name = host_name(text)
                if name is None:
                    self._refuse(request, "refused: not a host name", HOST_UNREACHABLE)
                    return
        if address is not None:
            checked = normalised(address)
            if not socks.policy.allows_address(checked, request.port):
                self._refuse(request, "refused: not on the allow list", NOT_ALLOWED)
                return
            if socks.is_itself(checked, request.port):
                self._refuse(request, "refused: that is this proxy itself", NOT_ALLOWED)
                return
            self._start(lambda: self._open_address(checked, request.port))
            return
        assert name is not None
        if not socks.policy.may_allow_name(name, request.port):
            self._refuse(request, "refused: not on the allow list", NOT_ALLOWED)
            return
        self._start(lambda: self._open_name(name, request.port))

    def _start(self, open_upstream: OpenUpstream) -> None:
        self._stage = CONNECTING
        early = bytes(self._buffer)
        self._buffer.clear()
        self.connect(open_upstream, early)

    async def _open_address(self, address: IPAddress, port: int) -> UpstreamProtocol:
        return await open_tcp(str(address), port)

    async def _open_name(self, name: str, port: int) -> UpstreamProtocol:
        """Resolve *name*, keep the addresses the allow list covers, connect to one of them."""
        policy = self.socks.policy
        resolved = [normalised(address) for address in await self.socks.resolve(name, port)]
        allowed = [
            address
            for address in dict.fromkeys(resolved)
            if policy.allows_resolved(name, address, port)
            and not self.socks.is_itself(address, port)
        ]
        if not allowed:
            shown = ", ".join(str(address) for address in dict.fromkeys(resolved))
            why = (
                "this proxy itself"
                if any(self.socks.is_itself(address, port) for address in resolved)
                else "not on the allow list"
            )
            raise Refusal(f"it resolves to {quote(shown, 60, bare=True)}, {why}")
        failure: OSError | None = None
        for address in allowed:
            try:
                return await open_tcp(str(address), port)
            except OSError as error:
                failure = error
        assert failure is not None
        raise failure

    def connected(self, upstream: UpstreamProtocol) -> bytes:
        assert upstream.transport is not None
        assert self._request is not None
        connected_to = format_address(upstream.transport.get_extra_info("peername"))
        if connected_to != host_and_port(_shown(self._request), self._request.port):
            self._via = f" ({connected_to})"
        if self._request.version == 4:
            self._write(socks4_reply(GRANTED))
        else:
            self._write(socks5_reply(SUCCEEDED, upstream.transport.get_extra_info("sockname")))
        return b""

    def connect_failed(self, error: Exception) -> None:
        assert self._request is not None
        if isinstance(error, Refusal):
            outcome = f"refused: {error}"
        elif isinstance(error, socket.gaierror):
            outcome = f"cannot resolve: {reason_of(error)}"
        else:
            outcome = f"cannot connect: {reason_of(error)}"
        self._refuse(self._request, outcome, code_for(error))

    def _refuse(self, request: Request, outcome: str, code: int = NOT_ALLOWED) -> None:
        if request.version == 4:
            self._write(socks4_reply(REJECTED))
            self.close_with(outcome)
        else:
            self._refuse_v5(code, outcome)

    def _refuse_v5(self, code: int, outcome: str) -> None:
        self._write(socks5_reply(code))
        self.close_with(outcome)


def _shown(request: Request) -> str:
    """The destination as the client gave it, safe for a log line."""
    if request.address is not None:
        return str(request.address)
    assert request.name is not None
    return quote(request.name.decode("ascii", errors="replace"), 60, bare=True)


# -- the service and the plugin ---------------------------------------------------------


class SocksService(RelayService):
    """The proxy: its listeners, the allow list, the users, the limits."""

    def __init__(
        self,
        *,
        policy: Policy,
        users_file: str | None,
        handshake_timeout: float,
        connect_timeout: float,
        idle_timeout: float | None,
        max_connections: int,
    ) -> None:
        super().__init__(
            access=access,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout,
            exposure=(
                "anyone who reaches it may relay to what --allow and --allow-host permit"
                if users_file is None
                else "anyone with a user's password may relay to what the allow list permits"
            ),
        )
        self.policy = policy
        self.users_file = users_file
        self.users: Users | None = None
        self.handshake_timeout = handshake_timeout
        self._lookups: asyncio.Semaphore | None = None
        self._own: list[tuple[IPAddress, int]] = []  # its listeners' addresses

    def privileged_start_service(self) -> None:
        """Read the users file (as the starting user: it may be readable by root only), bind."""
        if self.users_file is not None:
            self.users = read_users(self.users_file)
        super().privileged_start_service()
        self._own = [
            (ipaddress.ip_address(str(address[0]).split("%")[0]), int(address[1]))
            for server in self
            if isinstance(server, StreamServer) and server.listening is not None
            for sock in server.listening.sockets
            if sock.family in (socket.AF_INET, socket.AF_INET6)
            for address in [sock.getsockname()]
        ]
        if not self.policy.networks and not self.policy.hosts:
            log.warning(
                "nothing is allowed, so every request will be refused; "
                "say where clients may go with --allow CIDR[:PORTS] or --allow-host NAME[:PORTS]"
            )
        for rule in self.policy.networks:
            if rule.network.prefixlen == 0:
                log.warning(
                    "--allow %s lets clients reach every IPv%d address, loopback and private "
                    "networks included",
                    rule.network,
                    rule.network.version,
                )

    def is_itself(self, address: IPAddress, port: int) -> bool:
        """Whether *address* (normalised) and *port* reach one of the proxy's own listeners,
        which would relay to itself; a listener on every interface is reached by loopback."""
        for own, own_port in self._own:
            if port == own_port and (
                address == own
                or (own.is_unspecified and address.is_loopback and own.version == address.version)
            ):
                return True
        return False

    async def resolve(self, name: str, port: int) -> list[IPAddress]:
        """The addresses *name* resolves to, in the resolver's order, a few lookups at once."""
        if self._lookups is None:
            self._lookups = asyncio.Semaphore(CONCURRENT_LOOKUPS)
        loop = asyncio.get_running_loop()
        async with self._lookups:
            infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        addresses: list[IPAddress] = []
        for family, _, _, _, address in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                addresses.append(ipaddress.ip_address(str(address[0]).split("%")[0]))
        return addresses


class SocksFactory(RelayFactory):
    """Makes a SocksProtocol for each client, all sharing one SocksService."""

    protocol = SocksProtocol


class SocksMaker(ServiceMaker):
    name = "socks"
    description = "A SOCKS4, 4a and 5 proxy that relays only where --allow says."
    options = (
        Option(
            "listen",
            None,
            "1080",
            "An endpoint to listen on; a bare port listens on --iface.",
            type=endpoint_text,
            metavar="ENDPOINT",
            repeatable=True,
        ),
        IFACE,
        Option(
            "allow",
            None,
            None,
            "Let clients reach these addresses, and only these ports if given: "
            "127.0.0.0/8, 10.0.0.0/8:80,443, [::1]:8000-8100.",
            type=parse_network_rule,
            metavar="CIDR[:PORTS]",
            repeatable=True,
        ),
        Option(
            "allow-host",
            None,
            None,
            "Let clients reach this name and the names below it, at public addresses "
            "(others need --allow too): example.com, example.org:443.",
            type=parse_host_rule,
            metavar="SUFFIX[:PORTS]",
            repeatable=True,
        ),
        Option(
            "users",
            None,
            None,
            "Require SOCKS5 user and password (RFC 1929) from this file of name:password "
            "lines, read at start; SOCKS4 is then refused.",
            path=True,
            metavar="FILE",
        ),
        Option(
            "handshake-timeout",
            None,
            "10",
            "Close a client that has not said where to go within this many seconds.",
            type=positive_seconds,
            metavar="SECONDS",
        ),
        Option(
            "connect-timeout",
            None,
            "10",
            "Give up resolving and connecting after this many seconds.",
            type=positive_seconds,
            metavar="SECONDS",
        ),
        IDLE_TIMEOUT,
        MAX_CONNECTIONS,
    )

    def make_service(self, options: Mapping[str, object]) -> Service:
        policy = Policy(
            networks=tuple(given(options, "allow", NetworkRule)),
            hosts=tuple(given(options, "allow_host", HostRule)),
        )
        users = options.get("users")
        service = SocksService(
            policy=policy,
            users_file=None if users in (None, "") else str(users),
            handshake_timeout=number(options, "handshake_timeout"),
            connect_timeout=number(options, "connect_timeout"),
            idle_timeout=number(options, "idle_timeout") or None,
            max_connections=int(number(options, "max_connections")),
        )
        service.listen_on(
            given(options, "listen", str),
            SocksFactory(service),
            str(options["iface"]),
        )
        return service


service_maker = SocksMaker()
