"""systemd's side of a run: the sd_notify protocol, and sockets passed by socket activation.

Both are plain protocols on environment variables and file descriptors, spoken here
without libsystemd: ``NOTIFY_SOCKET`` names a datagram socket that takes ``KEY=VALUE``
lines (readiness, status, the watchdog), and ``LISTEN_PID``/``LISTEN_FDS``/
``LISTEN_FDNAMES`` describe listening sockets handed over from descriptor 3 on. The
same variables are set by ``systemd-socket-activate``, ``systemd-notify --ready``'s
peers and container runtimes that speak the protocol. This module knows nothing of
services, endpoints or event loops; the supervisor and the launcher decide when to notify.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from tend.addresses import format_address
from tend.errors import StartupError, quote

log = logging.getLogger("tend")

# sd_listen_fds(3): passed sockets start right after standard input, output and error.
LISTEN_FDS_START = 3

# What systemd calls a socket whose unit gave it no FileDescriptorName=.
UNNAMED = "unknown"

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SocketActivationError(StartupError):
    """Sockets passed by systemd that cannot be used, or that were never passed."""


# -- sd_notify ---------------------------------------------------------------------------


class Notifier:
    """Tells systemd (or whatever set ``NOTIFY_SOCKET``) how the service is doing.

    Each call sends one datagram of newline-separated ``KEY=VALUE`` lines, as
    ``systemd-notify`` does. A failed send is logged once, as a warning, and otherwise
    ignored: a server keeps serving when its supervisor cannot hear it.

    The socket is opened and connected when the notifier is made, so notifications
    still reach a path such as ``/run/systemd/notify`` after a chroot or a drop of
    privileges; it is reopened on the next send if a send fails.
    """

    def __init__(self, address: str, watchdog_usec: int | None = None) -> None:
        """Notify the socket at *address*: a path, or ``@name`` for an abstract socket.

        *watchdog_usec* is the watchdog timeout systemd gave this process, if any.
        """
        if not address.startswith(("/", "@")):
            raise ValueError(f"unsupported notification socket {address!r}")
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._warned = False
        with contextlib.suppress(OSError):
            self._socket = self._connect()

    def __repr__(self) -> str:
        return f"<Notifier {self.address!r}>"

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier | None:
        """The notifier ``NOTIFY_SOCKET`` asks for, or None if it is unset or empty.

        Call it in the process systemd started (the one ``$MAINPID`` names): the
        watchdog settings are read for *pid* (default: this process), as
        sd_watchdog_enabled(3) reads them, and kept for the process that will ping.
        """
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        if not address.startswith(("/", "@")):
            # systemd also knows vsock: addresses; a tend in a VM can't reach one anyway.
            log.warning("ignoring NOTIFY_SOCKET=%s: not a path or an @abstract name", address)
            return None
        return cls(address, _watchdog_usec(environ, os.getpid() if pid is None else pid))

    def _connect(self) -> socket.socket:
        name = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(name)
        except BaseException:
            sock.close()
            raise
        return sock

    def send(self, *lines: str) -> bool:
        """Send *lines* (``KEY=VALUE`` each) as one notification; False if it failed."""
        for line in lines:
            if "\n" in line or "=" not in line:
                raise ValueError(f"not a KEY=VALUE notification line: {line!r}")
        message = "\n".join(lines).encode()
        try:
            if self._socket is None:
                self._socket = self._connect()
            self._socket.send(message)
        except OSError as error:
            self._close_socket()
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot notify systemd through %s: %s; carrying on without it",
                    self.address,
                    error.strerror or error,
                )
            return False
        return True

    def ready(self, status: str | None = None, *, mainpid: int | None = None) -> bool:
        """Report that the service is ready (``READY=1``), with a status line.

        Give *mainpid* when the process that is ready is not the one systemd started,
        as after detaching: systemd then watches that process instead.
        """
        lines = ["READY=1"]
        if mainpid is not None:
            lines.insert(0, f"MAINPID={mainpid}")
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send(*lines)

    def stopping(self, status: str | None = None) -> bool:
        """Report that the service has begun to stop (``STOPPING=1``)."""
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send(*lines)

    def watchdog(self) -> bool:
        """Ping the watchdog (``WATCHDOG=1``): the service is still alive and serving."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """How often to ping the watchdog, in seconds (half its timeout); None if it is off."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2_000_000

    def close(self) -> None:
        """Close the socket. A later send opens it again."""
        self._close_socket()

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """``WATCHDOG_USEC`` if it is meant for *pid* (``WATCHDOG_PID`` unset or equal), else None."""
    text = environ.get("WATCHDOG_USEC", "")
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(text)


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


# -- socket activation -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """One listening socket passed by systemd: its descriptor, name, family and type."""

    fd: int
    name: str
    family: socket.AddressFamily
    type: socket.SocketKind
    listening: bool
    address: str

    def open(self) -> socket.socket:
        """A new non-blocking socket object on a duplicate of the passed descriptor.

        Each caller gets its own duplicate, so closing one (when a server stops)
        leaves the passed descriptor, and any other server using it, alone.
        """
        sock = socket.socket(fileno=os.dup(self.fd))
        sock.setblocking(False)
        return sock

    def __str__(self) -> str:
        return f"socket {self.fd - LISTEN_FDS_START} ({quote(self.name)}, {self.address})"


# The passed descriptors belong to the process, and the variables describing them are
# removed once read, so what the first reader found is kept for the rest of the process
# (and for the workers it forks, which inherit the descriptors too).
_inherited: list[InheritedSocket] | None = None


def inherited_sockets() -> list[InheritedSocket]:
    """The sockets systemd passed to this process, as sd_listen_fds_with_names(3) finds them.

    The first call reads ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` and then
    removes them from the environment, so that a program tend starts does not take the
    sockets for its own; the descriptors are marked close-on-exec for the same reason.
    Later calls in this process (several endpoints may ask for sockets, even the same
    one) return what the first one found; a forked worker shares it.

    Raises:
        SocketActivationError: no sockets were passed, or they were passed to another
            process.
    """
    global _inherited
    if _inherited is None:
        _inherited = read_inherited_sockets(os.environ, os.getpid())
    return list(_inherited)


def read_inherited_sockets(environ: MutableMapping[str, str], pid: int) -> list[InheritedSocket]:
    """Check the ``LISTEN_*`` variables in *environ* for process *pid*, take the sockets.

    The variables are removed from *environ* once they have been read successfully.

    Raises:
        SocketActivationError: as for inherited_sockets().
    """
    count_text = environ.get("LISTEN_FDS")
    if count_text is None:
        raise SocketActivationError(
            "cannot use socket activation: LISTEN_FDS is not set "
            "(is tend started by systemd or systemd-socket-activate?)"
        )
    if not (count_text.isascii() and count_text.isdigit()):
        raise SocketActivationError(
            f"cannot use socket activation: LISTEN_FDS is {quote(count_text)}, not a number"
        )
    owner = environ.get("LISTEN_PID")
    if owner is None:
        raise SocketActivationError(
            "cannot use socket activation: LISTEN_FDS is set but LISTEN_PID is not; "
            "whoever passed the sockets must say which process they are for"
        )
    if owner != str(pid):
        raise SocketActivationError(
            f"cannot use socket activation: LISTEN_PID is {owner} but this process is {pid}; "
            "the sockets were passed to another process (a script that starts tend must "
            "exec it, not run it as a child)"
        )
    count = int(count_text)
    names_text = environ.get("LISTEN_FDNAMES")
    names = [UNNAMED] * count if names_text is None else names_text.split(":")
    if len(names) != count:
        raise SocketActivationError(
            f"cannot use socket activation: LISTEN_FDNAMES names {len(names)} socket(s) "
            f"but LISTEN_FDS is {count}"
        )
    sockets = [_inspect(LISTEN_FDS_START + index, name) for index, name in enumerate(names)]
    for variable in _LISTEN_VARIABLES:
        environ.pop(variable, None)
    return sockets


def _inspect(fd: int, name: str) -> InheritedSocket:
    index = fd - LISTEN_FDS_START
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        raise SocketActivationError(
            f"cannot use socket activation: socket {index} (descriptor {fd}) "
            f"cannot be used: {error.strerror}"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise SocketActivationError(
            f"cannot use socket activation: socket {index} (descriptor {fd}) is not a socket"
        )
    # Ours now: a program tend starts must not inherit the listening sockets.
    os.set_inheritable(fd, False)
    # socket(fileno=) reads the family and type from the descriptor itself. This
    # object is only a lens: detach() hands the descriptor back without closing it.
    probe = socket.socket(fileno=fd)
    try:
        listening = bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        return InheritedSocket(
            fd, name, probe.family, probe.type, listening, _describe_address(probe)
        )
    finally:
        probe.detach()


def _describe_address(sock: socket.socket) -> str:
    try:
        address = sock.getsockname()
    except OSError:
        return "unbound"
    if sock.family == socket.AF_UNIX and not address:
        return "unnamed"
    return format_address(address)
