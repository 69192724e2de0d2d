"""Endpoint descriptions, and the listening sockets they describe.

A description is twistd's strports syntax: a kind, then colon-separated fields, the
first positional and the rest ``key=value``; a backslash escapes a colon, so an IPv6
address reads ``tcp:8000:interface=\\:\\:1``. A bare number means TCP on the default
interface. The kinds are ``tcp``, ``unix``, ``tls`` (alias ``ssl``) and ``systemd``
(sockets passed by socket activation). This module parses descriptions, and each
endpoint knows how to listen: `Endpoint.listen` binds it (or takes the sockets systemd
passed), in as many copies as there are workers where the kind allows, and returns a
`Listening` that owns the sockets, the TLS context and any UNIX socket file. It knows
nothing of services or event loops.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tend import daemon, systemd
from tend.addresses import format_address, host_and_port
from tend.errors import StartupError, TendError, quote
from tend.files import TLS_FILE_LIMIT, read_file

if TYPE_CHECKING:
    import ssl

# listen() takes an int and the kernel caps it at net.core.somaxconn: more is a mistake.
LARGEST_BACKLOG = 65535

# asyncio's default of 100 overflows when a few hundred clients connect at once, and
# every client whose SYN is dropped waits a full second to retransmit it. The kernel
# caps the value at net.core.somaxconn anyway, so ask for plenty.
DEFAULT_BACKLOG = 1024


class EndpointSyntaxError(TendError, ValueError):
    """An endpoint description that cannot be parsed."""


class ListenError(StartupError):
    """A listening socket that could not be opened."""


@dataclass(frozen=True, slots=True)
class TCPEndpoint:
    """Listen on *port* of *interface* ("" means every IPv4 interface)."""

    port: int
    interface: str = ""
    backlog: int = DEFAULT_BACKLOG
    reuse_port: bool = False

    passed_by_systemd = False

    def __str__(self) -> str:
        return host_and_port(self.interface or "0.0.0.0", self.port)

    def listen(self, copies: int = 1) -> Listening:
        """Bind and listen; with *copies* > 1, one SO_REUSEPORT socket set per copy.

        The kernel then spreads new connections over the copies' own accept queues,
        so each worker accepts on a copy of its own and none is woken for a connection
        another takes. Port 0 picks one port, which every copy then takes.
        """
        if copies <= 1:
            return Listening(self, [_listen_tcp(self)])
        if self.port and not self.reuse_port:
            # SO_REUSEPORT would let these copies share the port with another server of
            # this user's: bound once without it first, a port in use is refused as ever.
            for sock in _listen_tcp(self, listen=False):
                sock.close()
        first = replace(self, reuse_port=True)
        sets = [_listen_tcp(first)]
        try:
            again = replace(first, port=sets[0][0].getsockname()[1])
            for _ in range(copies - 1):
                sets.append(_listen_tcp(again))
        except BaseException:
            for sock in (sock for copy in sets for sock in copy):
                sock.close()
            raise
        return Listening(self, sets, rebind=lambda: _listen_tcp(again))


@dataclass(frozen=True, slots=True)
class UNIXEndpoint:
    """Listen on the UNIX socket at *path*, with file mode *mode* if given."""

    path: str
    mode: int | None = None
    backlog: int = DEFAULT_BACKLOG

    passed_by_systemd = False

    def __str__(self) -> str:
        return self.path

    def listen(self, copies: int = 1) -> Listening:
        """Bind the socket file; it cannot be bound twice, so every worker shares it."""
        sock = _listen_unix(self)
        return Listening(self, [[sock]], _SocketFile.bound_at(self.path))


@dataclass(frozen=True, slots=True)
class TLSEndpoint:
    """Listen with TLS on *port* of *interface*, with the certificate and key in PEM files.

    *cert_key* may hold the certificate chain (the server's certificate first), and the
    private key too, in which case *private_key* names the same file.
    """

    port: int
    cert_key: str
    private_key: str
    interface: str = ""
    backlog: int = DEFAULT_BACKLOG
    reuse_port: bool = False

    passed_by_systemd = False

    def __str__(self) -> str:
        return str(self.tcp)

    @property
    def tcp(self) -> TCPEndpoint:
        """The TCP endpoint underneath."""
        return TCPEndpoint(self.port, self.interface, self.backlog, self.reuse_port)

    def listen(self, copies: int = 1) -> Listening:
        """Read the certificate and key, then listen as TCP does.

        The key is read first, so a bad one leaves no socket open behind it.
        """
        context = tls_context(self)
        listening = self.tcp.listen(copies)
        return Listening(self, listening.copies, tls=context, rebind=listening.rebind)


@dataclass(frozen=True, slots=True)
class SystemdEndpoint:
    """Serve on listening sockets systemd passed (socket activation), by *index* or *name*.

    *index* counts the passed sockets from 0, in the order the .socket unit lists
    them; *name* picks every socket with that ``FileDescriptorName=`` (all a unit's
    sockets share the unit's name unless it gives one). *domain* (twistd's ``INET``,
    ``INET6`` or ``UNIX``) is checked if given. The socket is systemd's: tend binds
    nothing, and leaves a UNIX socket's file in place when it stops.
    """

    index: int | None = None
    name: str | None = None
    domain: str | None = None
    backlog: int = DEFAULT_BACKLOG

    # The sockets come from systemd: they must be taken in the process it started.
    passed_by_systemd = True

    def __str__(self) -> str:
        if self.name is not None:
            return f"systemd:name={self.name}"
        return f"systemd:index={self.index}"

    def listen(self, copies: int = 1) -> Listening:
        """Take the sockets systemd passed; they exist once, so every worker shares them."""
        return Listening(self, [_listen_systemd(self)])


Endpoint = TCPEndpoint | UNIXEndpoint | TLSEndpoint | SystemdEndpoint


class Listening:
    """The listening sockets of one endpoint, in one or more copies, and what goes with them.

    A copy is the set of sockets one worker accepts on: a TCP endpoint bound for N
    workers has N copies, each its own SO_REUSEPORT socket per address; a UNIX or passed
    socket has one copy, shared. The process that bound them (the supervisor) keeps
    every copy, so connections queued on a dead worker's copy wait for its replacement;
    a worker keeps only its own (`choose`). `close` closes them and removes a UNIX
    socket's file, if this process made it and it is still that file.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        copies: list[list[socket.socket]],
        socket_file: _SocketFile | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        rebind: Callable[[], list[socket.socket]] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.copies = copies
        self.tls = tls
        self.rebind = rebind  # binds one more copy, where copies are the kind's way
        self._socket_file = socket_file
        self._chosen = 0
        self._open = True

    def __repr__(self) -> str:
        return f"<Listening {self.endpoint} {self.addresses}>"

    @property
    def closed(self) -> bool:
        return not self._open

    @property
    def sockets(self) -> list[socket.socket]:
        """The sockets this process accepts on: its chosen copy."""
        return self.copies[self._chosen] if self._open else []

    @property
    def addresses(self) -> list[str]:
        """The addresses bound, e.g. ``127.0.0.1:43123`` after asking for port 0."""
        return [describe_socket(sock) for sock in self.sockets]

    @property
    def port(self) -> int | None:
        """The TCP port bound, if any."""
        for sock in self.sockets:
            if sock.family != socket.AF_UNIX:
                port: int = sock.getsockname()[1]
                return port
        return None

    @property
    def where(self) -> str:
        """Where it listens, as twistd's start line says it: the port, else the path."""
        if self.port is not None:
            return str(self.port)
        return self._shown_paths

    @property
    def label(self) -> str:
        """twistd's name for the port: ``TCP Port 10000`` or ``UNIX Port /run/x.sock``."""
        if self.port is not None:
            return f"TCP Port {self.port}"
        return f"UNIX Port {self._shown_paths}"

    @property
    def _shown_paths(self) -> str:
        """The socket paths, control characters escaped: a log line is one line."""
        return ", ".join(quote(address, 1024, bare=True) for address in self.addresses)

    def choose(self, index: int) -> None:
        """In a worker: accept on copy *index* (modulo the copies) only; close the others.

        The socket file, if any, is the supervisor's to remove: the worker lets go of its
        folder, which under --chroot would lead out of the jail.
        """
        if self._socket_file is not None:
            self._socket_file.forget()
            self._socket_file = None
        chosen = index % len(self.copies)
        for number, copy in enumerate(self.copies):
            if number != chosen:
                for sock in copy:
                    sock.close()
        self.copies = [self.copies[chosen]]
        self._chosen = 0

    def renamed(self, path: str) -> Listening:
        """This UNIX socket's Listening after its file was renamed to *path*."""
        if self._socket_file is not None:
            self._socket_file.forget()
        self._socket_file = _SocketFile.bound_at(path)
        return self

    def close_copy(self, index: int) -> None:
        """Close copy *index* (a dead worker's), so the kernel sends its clients elsewhere.

        Only where each worker has a copy of its own: a shared socket stays open.
        """
        if self.rebind is not None and 0 <= index < len(self.copies):
            for sock in self.copies[index]:
                sock.close()
            self.copies[index] = []

    def reopen_copy(self, index: int) -> None:
        """Bind copy *index* again if `close_copy` closed it (a worker is about to start).

        Raises:
            ListenError: the address can no longer be bound.
        """
        if self.rebind is not None and 0 <= index < len(self.copies) and not self.copies[index]:
            self.copies[index] = self.rebind()

    def forget(self) -> None:
        """Close every socket here, leaving any socket file to the process that made it."""
        if self._socket_file is not None:
            self._socket_file.forget()
            self._socket_file = None
        self.close()

    def close(self) -> None:
        """Close every socket, and remove the UNIX socket file if it is ours."""
        self._open = False
        for sock in (sock for copy in self.copies for sock in copy):
            sock.close()
        if self._socket_file is not None:
            self._socket_file.remove()
            self._socket_file = None


class _SocketFile:
    """The file of a UNIX socket this process bound, to remove when it stops listening.

    Only files tend bound are removed (a passed socket's file belongs to systemd, which
    needs it to start tend again), only by the process that bound it (a worker sharing its
    supervisor's socket must leave it), and only if it is still that socket: the folder is
    held open and the inode compared, so neither a chroot nor a new file at the same path
    makes tend remove the wrong thing.
    """

    def __init__(self, folder: int, name: str, inode: tuple[int, int]) -> None:
        self.folder = folder
        self.name = name
        self.inode = inode
        self.owner = os.getpid()

    @classmethod
    def bound_at(cls, path: str) -> _SocketFile | None:
        folder_path, name = os.path.split(path)
        try:
            folder = os.open(folder_path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            status = os.stat(name, dir_fd=folder)
        except OSError:
            os.close(folder)
            return None
        return cls(folder, name, (status.st_dev, status.st_ino))

    def forget(self) -> None:
        """Let go of the folder without removing anything (in a process that did not bind)."""
        with contextlib.suppress(OSError):
            os.close(self.folder)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            if os.getpid() == self.owner:
                status = os.stat(self.name, dir_fd=self.folder)
                if (status.st_dev, status.st_ino) == self.inode:
                    os.unlink(self.name, dir_fd=self.folder)
        with contextlib.suppress(OSError):
            os.close(self.folder)


# twistd's systemd endpoint names address families as its domain= values.
_DOMAINS = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


def endpoint_key(endpoint: Endpoint) -> str:
    """How an endpoint is named across a reload or an upgrade: its parsed form."""
    return repr(endpoint)


def inherited_listening(
    endpoint: Endpoint, copies: list[list[socket.socket]], wanted: int
) -> Listening:
    """A Listening of sockets an old tend passed on (an upgrade), as if bound here.

    Copies beyond *wanted* are closed, missing ones bound (a TCP endpoint's); a UNIX
    socket's file is this process's to remove from now on; a TLS key is read again.
    """
    for copy in copies:
        for sock in copy:
            sock.setblocking(False)
    rebind = None
    tcp = endpoint.tcp if isinstance(endpoint, TLSEndpoint) else endpoint
    if isinstance(tcp, TCPEndpoint) and copies[0] and wanted > 1:
        again = replace(tcp, port=copies[0][0].getsockname()[1], reuse_port=True)
        rebind = functools.partial(_listen_tcp, again)
    if rebind is not None or len(copies) > 1:
        for extra in copies[max(1, wanted) :]:
            for sock in extra:
                sock.close()
        copies = copies[: max(1, wanted)]
    while rebind is not None and len(copies) < wanted:
        copies.append(rebind())
    socket_file = (
        _SocketFile.bound_at(endpoint.path) if isinstance(endpoint, UNIXEndpoint) else None
    )
    context = tls_context(endpoint) if isinstance(endpoint, TLSEndpoint) else None
    return Listening(endpoint, copies, socket_file, tls=context, rebind=rebind)


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """Split a description into its positional fields and its ``key=value`` fields."""
    fields: list[str] = []
    current: list[str] = []
    characters = iter(description)
    for character in characters:
        if character == "\\":
            current.append(next(characters, "\\"))
        elif character == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(character)
    fields.append("".join(current))
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for field in fields:
        key, equals, value = field.partition("=")
        if equals:
            if not positional:
                raise EndpointSyntaxError(
                    f"invalid endpoint {quote(description, 50)}: it must begin with its kind "
                    "or a port, as tcp:PORT or unix:PATH"
                )
            if key in keywords:
                raise EndpointSyntaxError(
                    f"invalid endpoint {quote(description, 50)}: {quote(key, 40)} is given twice"
                )
            keywords[key] = value
        elif keywords:
            raise EndpointSyntaxError(
                f"invalid endpoint {quote(description, 50)}: "
                f"{quote(field, 40)} comes after a key=value field"
            )
        else:
            positional.append(field)
    return positional, keywords


def parse_endpoint(description: str, default_interface: str = "") -> Endpoint:
    """Turn *description* into an endpoint; a bare port listens on *default_interface*."""
    text = description.strip()
    if text.isdigit():
        return TCPEndpoint(_parse_port(text, description), default_interface)
    positional, keywords = split_description(text)
    kind = positional[0].lower()
    arguments = positional[1:]
    if kind == "tcp":
        return _parse_tcp(description, arguments, keywords, default_interface)
    if kind == "unix":
        return _parse_unix(description, arguments, keywords)
    if kind in ("tls", "ssl"):
        return _parse_tls(description, arguments, keywords, default_interface)
    if kind == "systemd":
        return _parse_systemd(description, arguments, keywords)
    raise EndpointSyntaxError(
        f"invalid endpoint {quote(description, 50)}: unknown kind {quote(kind, 20)}; "
        "expected PORT, tcp:, unix:, tls: or systemd:"
    )


def endpoint_text(text: str) -> str:
    """An option's type for an endpoint: *text* itself once `parse_endpoint` accepts it.

    The text, not the endpoint, is what the option delivers: a plugin passes it on to a
    listener with its own default interface (``--listen 8080`` on ``--iface``).

    Raises:
        argparse.ArgumentTypeError: the description is not one (the line says why).
    """
    import argparse  # here: a run that never parses an option's endpoint need not import it

    try:
        parse_endpoint(text)
    except EndpointSyntaxError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _parse_tcp(
    description: str, arguments: list[str], keywords: dict[str, str], default_interface: str
) -> TCPEndpoint:
    _expect_keys(description, keywords, {"port", "interface", "backlog", "reusePort"})
    if len(arguments) > 1 or (arguments and "port" in keywords):
        raise EndpointSyntaxError(f"invalid endpoint {quote(description, 50)}: too many fields")
    port_text = arguments[0] if arguments else keywords.get("port")
    if port_text is None:
        raise EndpointSyntaxError(f"invalid endpoint {quote(description, 50)}: no port given")
    return TCPEndpoint(
        port=_parse_port(port_text, description),
        interface=_parse_host(keywords.get("interface", default_interface), description),
        backlog=_parse_backlog(keywords, description),
        reuse_port=_parse_bool(keywords.get("reusePort", "no"), "reusePort", description),
    )


def _parse_unix(description: str, arguments: list[str], keywords: dict[str, str]) -> UNIXEndpoint:
    _expect_keys(description, keywords, {"address", "mode", "backlog"})
    path = arguments[0] if arguments else keywords.get("address", "")
    if len(arguments) > 1 or not path:
        raise EndpointSyntaxError(f"invalid endpoint {quote(description, 50)}: expected unix:PATH")
    mode = None
    if "mode" in keywords:
        if not re.fullmatch(r"0?[0-7]{1,3}", keywords["mode"]):
            raise EndpointSyntaxError(
                f"invalid endpoint {quote(description, 50)}: mode must be octal from 000 to 777, "
                "like 0660"
            )
        mode = int(keywords["mode"], 8)
    # Absolute now: the daemon changes directory before it removes the file on stop.
    return UNIXEndpoint(os.path.abspath(path), mode, _parse_backlog(keywords, description))


def _parse_tls(
    description: str, arguments: list[str], keywords: dict[str, str], default_interface: str
) -> TLSEndpoint:
    _expect_keys(
        description,
        keywords,
        {"port", "interface", "backlog", "reusePort", "certKey", "privateKey"},
    )
    if len(arguments) > 1 or (arguments and "port" in keywords):
        raise EndpointSyntaxError(f"invalid endpoint {quote(description, 50)}: too many fields")
    port_text = arguments[0] if arguments else keywords.get("port")
    if port_text is None:
        raise EndpointSyntaxError(f"invalid endpoint {quote(description, 50)}: no port given")
    # As in twistd, one file may hold both: either key names it for the other.
    cert_key = keywords.get("certKey") or keywords.get("privateKey")
    if not cert_key:
        raise EndpointSyntaxError(
            f"invalid endpoint {quote(description, 50)}: no certificate given; "
            "expected tls:PORT:certKey=CERT.pem:privateKey=KEY.pem"
        )
    private_key = keywords.get("privateKey") or cert_key
    return TLSEndpoint(
        port=_parse_port(port_text, description),
        # Made absolute now: the daemon changes to its rundir before it reads them.
        cert_key=os.path.abspath(cert_key),
        private_key=os.path.abspath(private_key),
        interface=_parse_host(keywords.get("interface", default_interface), description),
        backlog=_parse_backlog(keywords, description),
        reuse_port=_parse_bool(keywords.get("reusePort", "no"), "reusePort", description),
    )


def _parse_systemd(
    description: str, arguments: list[str], keywords: dict[str, str]
) -> SystemdEndpoint:
    _expect_keys(description, keywords, {"index", "name", "domain", "backlog"})
    expected = "expected systemd:index=N or systemd:name=NAME"
    if arguments or ("index" in keywords) == ("name" in keywords):
        raise EndpointSyntaxError(f"invalid endpoint {quote(description, 50)}: {expected}")
    index = None
    if "index" in keywords:
        text = keywords["index"]
        if not (text.isascii() and text.isdigit()) or int(text) > 1023:
            raise EndpointSyntaxError(
                f"invalid endpoint {quote(description, 50)}: index must be a number from 0 to 1023"
            )
        index = int(text)
    name = keywords.get("name")
    if name is not None and not name:
        raise EndpointSyntaxError(f"invalid endpoint {quote(description, 50)}: {expected}")
    domain = keywords.get("domain")
    if domain is not None and domain.upper() not in _DOMAINS:
        raise EndpointSyntaxError(
            f"invalid endpoint {quote(description, 50)}: domain must be INET, INET6 or UNIX"
        )
    return SystemdEndpoint(
        index=index,
        name=name,
        domain=None if domain is None else domain.upper(),
        backlog=_parse_backlog(keywords, description),
    )


def _expect_keys(description: str, keywords: dict[str, str], allowed: set[str]) -> None:
    unknown = sorted(set(keywords) - allowed)
    if unknown:
        raise EndpointSyntaxError(
            # The list of options is long: the values are quoted short, to keep one line.
            f"invalid endpoint {quote(description, 36)}: unknown option {quote(unknown[0], 20)}"
            f" (known: {', '.join(sorted(allowed))})"
        )


def _parse_host(text: str, description: str) -> str:
    """An interface: empty (every IPv4 interface), an IP address, or a host name."""
    if not text:
        return text
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    try:
        encoded = text.encode("idna")
    except UnicodeError:
        encoded = b""
    if (
        not encoded
        or len(encoded) > 253
        or not all(
            re.fullmatch(rb"[A-Za-z0-9-]{1,63}", label)
            for label in encoded.rstrip(b".").split(b".")
        )
    ):
        raise EndpointSyntaxError(
            f"invalid endpoint: interface {quote(text, 40)} is neither an IP address "
            "nor a host name"
        )
    return text


def _parse_port(text: str, description: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
        raise EndpointSyntaxError(
            f"invalid endpoint {quote(description, 50)}: port must be a number from 0 to 65535"
        )
    return int(text)


def _parse_backlog(keywords: dict[str, str], description: str) -> int:
    text = keywords.get("backlog", str(DEFAULT_BACKLOG))
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= LARGEST_BACKLOG:
        raise EndpointSyntaxError(
            f"invalid endpoint {quote(description, 50)}: backlog must be a positive number"
        )
    return int(text)


def _parse_bool(text: str, key: str, description: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise EndpointSyntaxError(f"invalid endpoint {quote(description, 50)}: {key} must be yes or no")


def _listen_tcp(endpoint: TCPEndpoint, *, listen: bool = True) -> list[socket.socket]:
    """The endpoint's sockets, bound and listening (only bound, without *listen*)."""
    host = endpoint.interface or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(
            host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ListenError(f"cannot listen on {quote(str(endpoint))}: {error.strerror}") from None
    except UnicodeError:  # a name IDNA cannot encode (a label past 63 characters, say)
        raise ListenError(
            f"cannot listen on {quote(str(endpoint))}: not a valid host name"
        ) from None
    addresses = list(dict.fromkeys((info[0], info[4][0]) for info in infos))
    sockets: list[socket.socket] = []
    port = endpoint.port
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if endpoint.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # Each address gets its own socket; don't let :: swallow 0.0.0.0.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, port))
            except OSError as error:
                raise ListenError(
                    f"cannot listen on {host_and_port(str(address), port)}: {_reason(error)}"
                ) from None
            # Port 0 picks a free port for the first address; the others must match it.
            port = sock.getsockname()[1]
            if listen:
                sock.listen(endpoint.backlog)
            sock.setblocking(False)
    except OSError as error:  # making the socket itself: out of descriptors, say
        for sock in sockets:
            sock.close()
        raise ListenError(f"cannot listen on {quote(str(endpoint))}: {_reason(error)}") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listen_unix(endpoint: UNIXEndpoint) -> socket.socket:
    _remove_stale_unix_socket(endpoint.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The file is made with its mode, not chmod-ed after: a chmod of the path could
        # follow a symbolic link swapped in between.
        with daemon.files_made_with_mode(endpoint.mode):
            sock.bind(endpoint.path)
    except OSError as error:
        sock.close()
        raise ListenError(f"cannot listen on {quote(endpoint.path)}: {_reason(error)}") from None
    try:
        sock.listen(endpoint.backlog)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise ListenError(f"cannot listen on {endpoint.path}: {_reason(error)}") from None
    return sock


def _listen_systemd(endpoint: SystemdEndpoint) -> list[socket.socket]:
    passed = systemd.inherited_sockets()
    if endpoint.index is not None:
        if endpoint.index >= len(passed):
            raise systemd.SocketActivationError(
                f"{endpoint} asks for socket {endpoint.index} but {_passed_count(len(passed))}"
            )
        chosen = [passed[endpoint.index]]
    else:
        chosen = [inherited for inherited in passed if inherited.name == endpoint.name]
        if not chosen:
            names = ", ".join(repr(inherited.name) for inherited in passed) or "none"
            raise systemd.SocketActivationError(
                f"{endpoint} asks for a socket named {quote(endpoint.name)}, but none was passed; "
                f"the names passed are: {names} (set FileDescriptorName= in the .socket unit)"
            )
    for inherited in chosen:
        _check_inherited(endpoint, inherited)
    sockets: list[socket.socket] = []
    try:
        for inherited in chosen:
            sockets.append(inherited.open())
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise ListenError(f"cannot use {endpoint}: {_reason(error)}") from None
    return sockets


def _passed_count(count: int) -> str:
    if count == 0:
        return "no sockets were passed"
    return f"only {count} {'was' if count == 1 else 'were'} passed"


def _check_inherited(endpoint: SystemdEndpoint, inherited: systemd.InheritedSocket) -> None:
    if inherited.type != socket.SOCK_STREAM:
        raise systemd.SocketActivationError(
            f"{endpoint} is {inherited}, which is not a stream socket; "
            "tend serves streams: use ListenStream= in the .socket unit"
        )
    if not inherited.listening:
        raise systemd.SocketActivationError(
            f"{endpoint} is {inherited}, which is not listening; "
            "use Accept=no (the default) in the .socket unit"
        )
    if endpoint.domain is not None and inherited.family != _DOMAINS[endpoint.domain]:
        raise systemd.SocketActivationError(
            f"{endpoint} is {inherited}, which is not in domain {endpoint.domain}"
        )


def tls_context(endpoint: TLSEndpoint) -> ssl.SSLContext:
    """Load *endpoint*'s certificate and key into a server context: TLS 1.2 or later.

    Call it in the privileged phase, as the starting user: a key readable only by
    root is read before tend drops to another user, and never needs to be again.

    Raises:
        ListenError: a file cannot be read, holds no certificate or key, holds an
            encrypted key, or holds a key that does not match the certificate.
    """
    import ssl

    certificate = _read_tls_file(endpoint.cert_key, "certificate")
    if endpoint.private_key != endpoint.cert_key:
        _read_tls_file(endpoint.private_key, "private key")

    def refuse_passphrase() -> str:
        raise ListenError(
            f"cannot use TLS private key {quote(endpoint.private_key)}: it is encrypted; "
            f"tend needs it unencrypted (openssl pkey -in KEY -out NEW_KEY)"
        )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(endpoint.cert_key, endpoint.private_key, refuse_passphrase)
    except (ssl.SSLError, ValueError, TypeError) as error:
        raise ListenError(_describe_tls_error(endpoint, certificate, error)) from None
    except OSError as error:  # the file changed between the reading and the loading
        raise ListenError(
            f"cannot read TLS certificate {quote(endpoint.cert_key, 60)} or private key "
            f"{quote(endpoint.private_key, 50)}: {error.strerror or error}"
        ) from None
    return context


def _read_tls_file(path: str, what: str) -> bytes:
    """The file's bytes: a regular file, never a FIFO to wait on, at most 1 MiB."""
    try:
        return read_file(path, f"TLS {what}", TLS_FILE_LIMIT)
    except StartupError as error:
        raise ListenError(str(error)) from None


def _describe_tls_error(endpoint: TLSEndpoint, certificate: bytes, error: Exception) -> str:
    """Say which file is wrong, and how, for an error OpenSSL reports as "PEM lib"."""
    import ssl

    if getattr(error, "reason", None) in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
        # Named by its file name alone when both files share a folder: the line stays short.
        cert_folder, cert_name = os.path.split(endpoint.cert_key)
        same_folder = cert_folder == os.path.dirname(endpoint.private_key)
        return (
            f"cannot use TLS private key {quote(endpoint.private_key, 70)}: it does not match "
            f"the certificate in {quote(cert_name if same_folder else endpoint.cert_key, 50)}"
        )
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cadata=certificate.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError, TypeError):  # not PEM, empty, or not text at all
        return f"cannot use TLS certificate {quote(endpoint.cert_key)}: it holds no PEM certificate"
    if endpoint.private_key == endpoint.cert_key:
        return (
            f"cannot use TLS certificate {quote(endpoint.cert_key)}: it holds no PEM private key; "
            "give the key's file as privateKey=PATH"
        )
    return f"cannot use TLS private key {quote(endpoint.private_key)}: it holds no PEM private key"


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a server that died, but never a live one."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return  # bind will fail with "address already in use"; say nothing more.
    except OSError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError:
            pass


def _reason(error: OSError) -> str:
    """Describe an OS error in lower case, as the rest of a one-line message reads."""
    if error.errno is None:
        return str(error)
    text = os.strerror(error.errno)
    if error.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
        text = text[0].lower() + text[1:]
    return text


def describe_socket(sock: socket.socket) -> str:
    """Name the address a listening socket is bound to: ``127.0.0.1:10000`` or a path."""
    return format_address(sock.getsockname())
