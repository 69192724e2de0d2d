"""``tend ftp``: read-only anonymous FTP of one folder.

The commands real clients send (curl, wget, lftp, tnftp, Python's ftplib), from RFC 959,
2389 (FEAT, OPTS), 2428 (EPSV, EPRT) and 3659 (SIZE, MDTM, REST, MLSD, MLST), and none
that writes: those answer 550. Safe where twistd's ftp plugin is not:

- a passive data port listens on the control connection's own local address, takes one
  connection, from the control peer's address only, within ``--data-timeout``; any other
  address that connects first is reset and gets nothing;
- PORT and EPRT are refused unless ``--allow-active``, and then connect only to the
  control peer, on a port of 1024 or more (no FTP bounce, RFC 2577);
- every path is confined to the folder by its real path: a symbolic link that leads out
  is refused, and left out of listings;
- a name holding CR or LF is never listed nor accepted, so no name can split a reply.

Files go out with ``os.sendfile`` straight from the page cache to the data socket (what
``loop.sendfile`` does on the asyncio loop; uvloop has no ``loop.sendfile``), waiting for
the socket to be writable in between, so that a client that stops reading is cut after
``--data-timeout`` without progress. Owns the FTP sessions and their data connections;
listening and draining are tend's `StreamServer`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import posixpath
import random
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from tend import (
    AccessLog,
    Flag,
    MultiService,
    Option,
    Service,
    ServiceMaker,
    StartupError,
    StreamServer,
    endpoint_text,
    format_address,
    positive_seconds,
    quote,
)
from tend.builtins.common import warn_if_exposed, whole_number

log = logging.getLogger(__name__)
# One line per transfer or listing: client, command, path, bytes, duration, outcome.
access = AccessLog(__name__)

# A command line longer than this (CRLF included) ends the session: no FTP command needs
# more, and a client sending more is broken or hostile.
LINE_LIMIT = 4096
# USER names that log in, with any password (which is never logged).
ANONYMOUS = frozenset({"anonymous", "ftp"})
# Failed USER attempts before the connection is closed.
MOST_FAILED_LOGINS = 3
# How long a closing session may take to flush its last reply to a client that does not read.
CLOSE_TIMEOUT = 5.0
# Bytes of a listing or a file handed to the kernel per call.
CHUNK = 1 << 20

# The facts MLSD and MLST give (RFC 3659 §7), in the order they are written.
FACTS = ("type", "size", "modify", "perm")
# Commands that would change the folder: refused, since the server is read-only.
WRITE_COMMANDS = frozenset(
    {"STOR", "STOU", "APPE", "DELE", "MKD", "XMKD", "RMD", "XRMD", "RNFR", "RNTO", "SITE"}
    | {"MFMT", "MFCT", "MFF", "CHMOD"}
)
# Commands answered before login; the rest need it.
BEFORE_LOGIN = frozenset(
    {"USER", "PASS", "QUIT", "NOOP", "SYST", "FEAT", "OPTS", "HELP", "AUTH", "PBSZ", "PROT"}
    | {"CLNT", "STAT", "ABOR"}
)
# Commands that send over a data connection: each gets a line in the access log.
TRANSFERS = frozenset({"RETR", "LIST", "NLST", "MLSD"})
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
HALF_A_YEAR = 182 * 24 * 3600
_LINGER_RESET = struct.pack("ii", 1, 0)


# -- options ------------------------------------------------------------------------------


def listen_endpoint(text: str) -> str:
    """One ``--listen`` value: a port or a TCP endpoint (not unix: nor tls:)."""
    endpoint_text(text)
    kind = text.strip().partition(":")[0].lower()
    if kind in ("unix", "tls", "ssl"):
        raise argparse.ArgumentTypeError(
            f"invalid endpoint {quote(text, 50)}: FTP needs TCP (its data connections go to "
            "IP addresses) and this server has no TLS; give a port or tcp:PORT"
        )
    return text


def port_range(text: str) -> tuple[int, int]:
    """``LOW-HIGH`` for ``--passive-ports``: ports from 1024 to 65535, LOW at most HIGH."""
    low, dash, high = text.partition("-")
    if (
        dash
        and low.isascii()
        and low.isdigit()
        and high.isascii()
        and high.isdigit()
        and 1024 <= int(low) <= int(high) <= 65535
    ):
        return int(low), int(high)
    raise argparse.ArgumentTypeError(
        f"invalid port range {quote(text)}: expected LOW-HIGH, "
        "two port numbers from 1024 to 65535 with LOW at most HIGH"
    )


# A whole number, at least 1, in ASCII digits.
positive_count = whole_number(1, 1_000_000, "number")


@dataclass(frozen=True, slots=True)
class Settings:
    """What an FTP server is told to do, from its options."""

    root: str
    allow_active: bool = False
    passive_ports: tuple[int, int] | None = None
    login_timeout: float = 30.0
    idle_timeout: float = 300.0
    data_timeout: float = 30.0
    max_clients: int = 64
    max_clients_per_ip: int = 16


# -- the folder ---------------------------------------------------------------------------


class Refused(Exception):
    """A command refused, with the reply to give: ``Refused(550, "No such file")``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True, slots=True)
class Entry:
    """A file or folder found inside the served folder."""

    virtual: str  # the path the client sees: /sub/file.txt
    real: str  # the real path, inside the folder
    status: os.stat_result

    @property
    def is_folder(self) -> bool:
        return stat.S_ISDIR(self.status.st_mode)


def is_listable(name: str) -> bool:
    """False for a name that would split a reply or a listing line."""
    return "\r" not in name and "\n" not in name


class Folder:
    """The served folder: maps a client's paths to real ones inside it, or refuses them.

    Blocking file-system calls; sessions run them in a thread.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._prefix = self.root.rstrip("/") + "/"

    def inside(self, real: str) -> bool:
        """True if the real path *real* is the folder or below it."""
        return real == self.root or real.startswith(self._prefix)

    def find(self, cwd: str, argument: str) -> Entry:
        """The file or folder *argument* names, relative to the virtual folder *cwd*.

        Raises:
            Refused: no such file, or one that leads out of the folder (a symbolic link
                pointing out), or neither a regular file nor a folder.
        """
        virtual = posixpath.normpath(posixpath.join(cwd, argument))
        # normpath keeps a leading "//" (POSIX lets it mean something else); "/.." is "/".
        virtual = "/" + virtual.lstrip("/")
        real = os.path.realpath(os.path.join(self.root, virtual.lstrip("/")))
        if not self.inside(real):
            raise Refused(550, f"{show(virtual)}: leads outside the served folder.")
        try:
            status = os.stat(real)
        except OSError as error:
            raise Refused(550, f"{show(virtual)}: {error.strerror}.") from None
        if not (stat.S_ISREG(status.st_mode) or stat.S_ISDIR(status.st_mode)):
            raise Refused(550, f"{show(virtual)}: not a regular file or folder.")
        return Entry(virtual, real, status)

    def folder(self, cwd: str, argument: str) -> Entry:
        """Like `find`, for a folder only."""
        entry = self.find(cwd, argument)
        if not entry.is_folder:
            raise Refused(550, f"{show(entry.virtual)}: not a folder.")
        return entry

    def entries(self, folder: Entry) -> list[tuple[str, os.stat_result]]:
        """The names in *folder* with their status, sorted, leaving out what must not show.

        Left out: names with CR or LF, symbolic links leading out of the folder or nowhere,
        and anything but regular files and folders (FIFOs, devices, sockets).
        """
        try:
            names = sorted(os.listdir(folder.real))
        except OSError as error:
            raise Refused(550, f"{show(folder.virtual)}: {error.strerror}.") from None
        found = []
        for name in names:
            if not is_listable(name):
                continue
            path = os.path.join(folder.real, name)
            try:
                status = os.lstat(path)
                if stat.S_ISLNK(status.st_mode):
                    if not self.inside(os.path.realpath(path)):
                        continue
                    status = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(status.st_mode) or stat.S_ISDIR(status.st_mode):
                found.append((name, status))
        return found

    def open(self, entry: Entry) -> int:
        """A descriptor on the regular file *entry*, opened without following a last link.

        Raises:
            Refused: it is not a regular file (or no longer), or cannot be opened.
        """
        try:
            fd = os.open(entry.real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as error:
            raise Refused(550, f"{show(entry.virtual)}: {error.strerror}.") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise Refused(550, f"{show(entry.virtual)}: not a regular file.")
        return fd


def show(path: str) -> str:
    """*path* as it may appear in a reply: printable, never a CR or LF."""
    return path.replace("\r", "\\r").replace("\n", "\\n")


def stamp(mtime: float) -> str:
    """A modification time as RFC 3659 writes it: UTC ``YYYYMMDDHHMMSS``."""
    try:
        return time.strftime("%Y%m%d%H%M%S", time.gmtime(mtime))
    except (OverflowError, OSError, ValueError):
        return "19700101000000"


def ls_line(name: str, status: os.stat_result, now: float) -> str:
    """One line of ``LIST``, as ``ls -l`` writes it, read-only, owned by ftp."""
    mode = "dr-xr-xr-x" if stat.S_ISDIR(status.st_mode) else "-r--r--r--"
    try:
        when = time.gmtime(status.st_mtime)
    except (OverflowError, OSError, ValueError):
        when = time.gmtime(0)
    month = MONTHS[when.tm_mon - 1]
    if now - HALF_A_YEAR < status.st_mtime < now + 24 * 3600:
        date = f"{month} {when.tm_mday:2d} {when.tm_hour:02d}:{when.tm_min:02d}"
    else:
        date = f"{month} {when.tm_mday:2d}  {when.tm_year}"
    return f"{mode} {status.st_nlink:3d} ftp      ftp      {status.st_size:>12d} {date} {name}\r\n"


def facts_of(status: os.stat_result, kind: str, chosen: Sequence[str]) -> str:
    """The MLSD/MLST facts of a file or folder: ``type=file;size=12;modify=...;perm=r;``."""
    values = {
        "type": kind,
        "size": str(status.st_size),
        "modify": stamp(status.st_mtime),
        "perm": "el" if kind in ("dir", "cdir") else "r",
    }
    return "".join(f"{fact}={values[fact]};" for fact in FACTS if fact in chosen)


def kind_of(status: os.stat_result) -> str:
    return "dir" if stat.S_ISDIR(status.st_mode) else "file"


# -- data connections ----------------------------------------------------------------------


class DataError(Exception):
    """A data connection that could not be made; the transfer answers 425."""


def normalize(host: str) -> str:
    """An IP address written one way: an IPv4-mapped IPv6 address as its IPv4 address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def refuse_socket(sock: socket.socket) -> None:
    """Close *sock* with a reset: whoever connected gets nothing, not even a clean end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


class PassivePort:
    """A passive data port: one connection, from one address, within a deadline.

    It listens on the control connection's local address (never every interface) and
    accepts connections until one comes from *peer* (the control connection's peer
    address); any other is reset at once and logged. The listener closes after that one
    connection, or after *timeout* seconds.
    """

    def __init__(self, sock: socket.socket, peer: str, timeout: float, client: str) -> None:
        self.port: int = sock.getsockname()[1]
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept(peer, timeout, client))

    async def _accept(self, peer: str, patience: float, client: str) -> socket.socket:
        loop = asyncio.get_running_loop()
        refused = 0
        try:
            async with asyncio.timeout(patience):
                while True:
                    connection, address = await loop.sock_accept(self._sock)
                    if normalize(address[0]) == peer:
                        connection.setblocking(False)
                        return connection
                    refuse_socket(connection)
                    refused += 1
                    if refused == 1:  # one line, however many a flood makes
                        log.warning(
                            "refused a data connection from %s to the passive port %d of %s",
                            format_address(address),
                            self.port,
                            client,
                        )
        finally:
            self._sock.close()
            if refused > 1:
                log.warning(
                    "refused %d data connections in all to the passive port %d of %s",
                    refused,
                    self.port,
                    client,
                )

    async def connection(self) -> socket.socket:
        """The data connection, once the client has made it.

        Raises:
            DataError: it did not come within the timeout.
        """
        try:
            return await asyncio.shield(self._task)
        except TimeoutError:
            raise DataError("no data connection came to the passive port in time") from None
        except OSError as error:
            raise DataError(f"the passive port failed: {error.strerror}") from None

    def close(self) -> None:
        """Stop listening; close a data connection made but never used."""
        if not self._task.done():
            self._task.cancel()
            # Closed once the task has let go of it (a task cancelled before it ever ran
            # never reaches its own finally).
            self._task.add_done_callback(lambda _: self._sock.close())
        elif not self._task.cancelled() and self._task.exception() is None:
            self._task.result().close()


def listen_passive(
    family: socket.AddressFamily, local: tuple[object, ...], ports: tuple[int, int] | None
) -> socket.socket:
    """A listening socket on the address *local*, on a port of *ports* (any if None).

    Raises:
        DataError: no port of the range is free.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if ports is None:
            candidates: Sequence[int] = (0,)
        else:
            low, high = ports
            start = random.randint(low, high)
            candidates = [*range(start, high + 1), *range(low, start)]
        for port in candidates:
            try:
                sock.bind((local[0], port, *local[2:]))
                break
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
        else:
            raise DataError("every port of --passive-ports is in use")
        # Room for a few thieves queued ahead of the client, whose SYN must not be dropped.
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def writable(sock: socket.socket, stall: float) -> None:
    """Wait until *sock* can take more bytes, for at most *stall* seconds."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = sock.fileno()
    loop.add_writer(fd, wake)
    try:
        async with asyncio.timeout(stall):
            await ready
    finally:
        loop.remove_writer(fd)


class Progress:
    """How many bytes a transfer has handed to the kernel so far, for its log line."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = 0


async def send_bytes(sock: socket.socket, data: bytes, stall: float, progress: Progress) -> None:
    """Send *data*; fail if the peer takes nothing for *stall* seconds."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            count = sock.send(view[done : done + CHUNK])
        except (BlockingIOError, InterruptedError):
            await writable(sock, stall)
            continue
        done += count
        progress.sent += count


async def send_file(
    sock: socket.socket, fd: int, offset: int, count: int, stall: float, progress: Progress
) -> None:
    """Send *count* bytes of the file *fd* from *offset* with sendfile.

    Fewer go if the file shrank meanwhile. Fails if the peer takes nothing for *stall*
    seconds. Where the kernel cannot sendfile this file, it is read and sent instead.
    """
    done = 0
    while done < count:
        try:
            sent = os.sendfile(sock.fileno(), fd, offset + done, min(count - done, CHUNK))
        except (BlockingIOError, InterruptedError):
            await writable(sock, stall)
            continue
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or done:
                raise
            await send_read(sock, fd, offset, count, stall, progress)
            return
        if sent == 0:
            return
        done += sent
        progress.sent += sent


async def send_read(
    sock: socket.socket, fd: int, offset: int, count: int, stall: float, progress: Progress
) -> None:
    """`send_file` without sendfile: read a piece, send it, and so on."""
    done = 0
    while done < count:
        piece = os.pread(fd, min(count - done, CHUNK), offset + done)
        if not piece:
            return
        await send_bytes(sock, piece, stall, progress)
        done += len(piece)


# -- sessions -----------------------------------------------------------------------------


# Other names clients use for some commands.
ALIASES = {"XPWD": "PWD", "XCWD": "CWD", "XCUP": "CDUP", "PBSZ": "AUTH", "PROT": "AUTH"}


class Session:
    """One control connection: reads commands, answers them, runs one transfer at a time."""

    def __init__(
        self, service: FTPService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.service = service
        self.settings = service.settings
        self.folder = service.folder
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        self.client = format_address(peer)
        self.peer = normalize(peer[0])
        self.local = local
        self.local_host = normalize(local[0])
        self.data_family = socket.AF_INET6 if ":" in self.local_host else socket.AF_INET
        self.cwd = "/"
        self.user: str | None = None
        self.logged_in = False
        self.failed_logins = 0
        self.rest = 0
        self.epsv_all = False
        self.facts: tuple[str, ...] = FACTS
        self.passive: PassivePort | None = None
        self.active: tuple[str, int] | None = None
        self.transfer: asyncio.Task[None] | None = None
        self.waiting = False  # for a command, with nothing to finish
        self.closing = False
        loop = asyncio.get_running_loop()
        self.login_deadline = loop.time() + self.settings.login_timeout
        self.last_activity = loop.time()

    # -- replies

    def reply(self, code: int, text: str) -> None:
        """Send a one-line reply (unless the connection is closing: then there is no one)."""
        if self.writer.transport.is_closing():
            return
        self.writer.write(f"{code} {show(text)}\r\n".encode("utf-8", "surrogateescape"))

    def reply_lines(self, code: int, first: str, lines: Sequence[str], last: str) -> None:
        """Send a multi-line reply: ``code-first``, each line (indented), ``code last``."""
        if self.writer.transport.is_closing():
            return
        body = "".join(f" {show(line)}\r\n" for line in lines)
        text = f"{code}-{show(first)}\r\n{body}{code} {show(last)}\r\n"
        self.writer.write(text.encode("utf-8", "surrogateescape"))

    async def flush(self) -> None:
        """Wait until the client has taken the replies; cut a client that never reads."""
        async with asyncio.timeout(self.settings.idle_timeout):
            await self.writer.drain()

    def close(self, code: int, text: str) -> None:
        """Say why, then close the control connection; the read loop then ends."""
        if not self.closing:
            self.closing = True
            self.reply(code, text)
            self.writer.close()

    def shutdown(self) -> None:
        """The server is stopping: close now if idle, else once the current work is done."""
        if self.waiting and not self.transferring:
            self.close(421, "The server is shutting down.")

    @property
    def transferring(self) -> bool:
        return self.transfer is not None and not self.transfer.done()

    # -- the command loop

    async def run(self) -> None:
        """Greet, then answer commands until QUIT, a timeout, or the end of the connection."""
        sock = self.writer.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            # Telnet "urgent" data (an ABOR sent with MSG_OOB) stays in the command stream.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        self.reply(220, "tend ftp: read-only, anonymous (user anonymous or ftp).")
        try:
            await self.flush()
            while not self.closing:
                line = await self.next_line()
                if line is None:
                    break
                self.last_activity = asyncio.get_running_loop().time()
                await self.handle(line)
                if self.service.stopping and not self.transferring:
                    self.close(421, "The server is shutting down.")
                await self.flush()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            await self.end()

    async def next_line(self) -> bytes | None:
        """The next command line, or None once the session should end."""
        loop = asyncio.get_running_loop()
        self.waiting = True
        try:
            while True:
                if not self.logged_in:
                    deadline, why = self.login_deadline, "Login timeout"
                else:
                    deadline = self.last_activity + self.settings.idle_timeout
                    why = "Idle timeout"
                if self.transferring:
                    deadline = max(deadline, loop.time() + self.settings.idle_timeout)
                try:
                    async with asyncio.timeout_at(deadline):
                        line = await self.reader.readline()
                except TimeoutError:
                    if self.transferring or loop.time() < deadline:
                        continue
                    self.close(421, f"{why}: closing the control connection.")
                    return None
                except ValueError:
                    self.close(500, f"Command line too long (the limit is {LINE_LIMIT} bytes).")
                    return None
                if not line.endswith(b"\n"):
                    return None  # the end of the connection, perhaps mid-line
                return line
        finally:
            self.waiting = False

    async def handle(self, line: bytes) -> None:
        """Answer one command line."""
        # Telnet commands (IAC IP, IAC DM before an urgent ABOR) are not part of a command.
        if b"\xff" in line:
            line = bytes(_strip_telnet(line))
        text = line.rstrip(b"\n").removesuffix(b"\r").decode("utf-8", "surrogateescape")
        name, _, argument = text.partition(" ")
        name = name.upper()
        if not (name.isascii() and name.isalpha() and len(name) <= 8):
            self.reply(500, "Syntax error: not a command.")
            return
        if "\r" in argument or "\0" in argument:
            self.reply(501, "Syntax error: CR or NUL in the argument.")
            return
        transfer = self.transfer
        if transfer is not None and not transfer.done():
            if name == "ABOR":
                await self.abort(transfer)
                return
            # One command at a time: the next waits for the transfer's final reply.
            await asyncio.wait([transfer])
        if name in WRITE_COMMANDS:
            self.reply(550, "Permission denied: this server is read-only.")
            return
        handler = getattr(self, "ftp_" + ALIASES.get(name, name).lower(), None)
        if handler is None:
            self.reply(502, f"Command {name} is not implemented.")
            return
        if not self.logged_in and name not in BEFORE_LOGIN:
            self.reply(530, "Log in first, as anonymous or ftp.")
            return
        try:
            await handler(argument)
        except Refused as refusal:
            self.reply(refusal.code, refusal.text)
            if name in TRANSFERS:  # a refused download is worth a line too: it may be a probe
                access.info(
                    "%s %s %s 0 bytes 0.000 s %d", self.client, name, quote(argument), refusal.code
                )
        except OSError as error:  # one the folder's checks did not foresee
            self.reply(451, f"Local error: {error.strerror or error}.")

    async def end(self) -> None:
        """Stop the transfer and the data ports, and close the control connection."""
        if self.transfer is not None:
            self.transfer.cancel()
            await asyncio.wait([self.transfer])
        self.forget_data()
        self.writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.writer.wait_closed()
        except Exception:  # a client that never reads its last reply, or a reset
            self.writer.transport.abort()

    # -- file-system calls, off the loop

    async def find(self, argument: str) -> Entry:
        return await asyncio.to_thread(self.folder.find, self.cwd, argument)

    async def find_folder(self, argument: str) -> Entry:
        return await asyncio.to_thread(self.folder.folder, self.cwd, argument)

    # -- data connections

    def forget_data(self) -> None:
        """Drop the passive port or active address set up for the next transfer."""
        if self.passive is not None:
            self.passive.close()
            self.passive = None
        self.active = None

    async def data_connection(self) -> socket.socket:
        """The data connection set up by PASV/EPSV (accepted) or PORT/EPRT (connected).

        Raises:
            DataError: none was set up, or it could not be made.
        """
        if self.passive is not None:
            return await self.passive.connection()
        if self.active is None:
            raise DataError("use PASV or EPSV first")
        host, port = self.active
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if family == self.data_family:
                sock.bind(self.local_address())
            async with asyncio.timeout(self.settings.data_timeout):
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except (OSError, TimeoutError) as error:
            sock.close()
            reason = "timed out" if isinstance(error, TimeoutError) else error.strerror
            raise DataError(f"cannot connect to {format_address((host, port))}: {reason}") from None
        return sock

    def start_transfer(
        self,
        name: str,
        path: str,
        opening: str,
        send: Callable[[socket.socket, Progress], Awaitable[None]],
        cleanup: Callable[[], None] = lambda: None,
    ) -> None:
        """Run a transfer in the background, so that ABOR can still be read meanwhile."""
        self.transfer = asyncio.get_running_loop().create_task(
            self._transfer(name, path, opening, send, cleanup)
        )

    async def _transfer(
        self,
        name: str,
        path: str,
        opening: str,
        send: Callable[[socket.socket, Progress], Awaitable[None]],
        cleanup: Callable[[], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        started = self.last_activity  # when the command came
        progress = Progress()
        outcome = "226"
        data: socket.socket | None = None
        try:
            data = await self.data_connection()
            self.reply(150, opening)
            await send(data, progress)
            data.close()
            data = None
            self.reply(226, "Transfer complete.")
        except DataError as error:
            outcome = "425"
            self.reply(425, f"Cannot open the data connection: {error}.")
        except (OSError, TimeoutError) as error:
            outcome = "426"
            why = "stalled" if isinstance(error, TimeoutError) else error.strerror
            self.reply(426, f"Data connection closed ({why}); transfer aborted.")
        except asyncio.CancelledError:
            outcome = "426"
            self.reply(426, "Transfer aborted.")
            raise
        except Exception:
            # A bug: the session goes on, the traceback goes to the log.
            log.exception("the %s of %s failed", name, self.client)
            outcome = "451"
            self.reply(451, "Local error; transfer aborted.")
        finally:
            if data is not None:
                refuse_socket(data)
            cleanup()
            self.forget_data()
            self.last_activity = loop.time()
            access.info(
                "%s %s %s %d bytes %.3f s %s",
                self.client,
                name,
                quote(path),
                progress.sent,
                loop.time() - started,
                outcome,
            )
            if self.service.stopping and self.waiting:
                self.close(421, "The server is shutting down.")
        with contextlib.suppress(ConnectionError, TimeoutError):
            await self.flush()

    async def abort(self, transfer: asyncio.Task[None]) -> None:
        """ABOR during a transfer: stop it (426), then confirm (226)."""
        transfer.cancel()
        await asyncio.wait([transfer])
        self.reply(226, "ABOR successful.")

    async def send_listing(self, name: str, path: str, build: Callable[[], str]) -> None:
        """Build a listing in a thread, then send it over the data connection."""
        self.rest = 0
        if self.passive is None and self.active is None:
            raise Refused(425, "Use PASV or EPSV first.")
        payload = (await asyncio.to_thread(build)).encode("utf-8", "surrogateescape")
        stall = self.settings.data_timeout
        self.start_transfer(
            name,
            path,
            "Here comes the listing.",
            lambda sock, progress: send_bytes(sock, payload, stall, progress),
        )

    # -- the commands: session

    async def ftp_user(self, argument: str) -> None:
        self.logged_in = False
        if argument.lower() in ANONYMOUS:
            self.user = argument
            self.reply(331, "Anonymous login ok; send any password.")
            return
        self.user = None
        self.failed_logins += 1
        if self.failed_logins >= MOST_FAILED_LOGINS:
            self.close(421, "Too many failed logins.")
            return
        self.reply(530, "Only anonymous logins are accepted (user anonymous or ftp).")

    async def ftp_pass(self, argument: str) -> None:
        # The password (by custom an e-mail address) is never kept nor logged.
        if self.logged_in:
            self.reply(230, "Already logged in.")
        elif self.user is None:
            self.reply(503, "Send USER first.")
        else:
            self.logged_in = True
            self.last_activity = asyncio.get_running_loop().time()
            self.reply(230, "Logged in anonymously; read-only access.")

    async def ftp_quit(self, argument: str) -> None:
        self.close(221, "Goodbye.")

    async def ftp_noop(self, argument: str) -> None:
        self.reply(200, "NOOP ok.")

    async def ftp_syst(self, argument: str) -> None:
        self.reply(215, "UNIX Type: L8")

    async def ftp_feat(self, argument: str) -> None:
        features = [
            "EPSV",
            "MDTM",
            "MLST " + "".join(f"{fact}{'*' if fact in self.facts else ''};" for fact in FACTS),
            "PASV",
            "REST STREAM",
            "SIZE",
            "TVFS",
            "UTF8",
        ]
        if self.settings.allow_active:
            features.insert(0, "EPRT")
        self.reply_lines(211, "Features:", features, "End")

    async def ftp_opts(self, argument: str) -> None:
        option, _, value = argument.partition(" ")
        option = option.upper()
        if option == "UTF8":
            self.reply(200, "Always in UTF8 mode.")
        elif option == "MLST":
            asked = {fact.lower() for fact in value.split(";") if fact}
            self.facts = tuple(fact for fact in FACTS if fact in asked)
            self.reply(200, "MLST OPTS " + "".join(f"{fact};" for fact in self.facts))
        else:
            self.reply(501, "Unknown option.")

    async def ftp_help(self, argument: str) -> None:
        names = sorted(
            [name[4:].upper() for name in dir(self) if name.startswith("ftp_")] + list(ALIASES)
        )
        lines = [" ".join(names[index : index + 12]) for index in range(0, len(names), 12)]
        self.reply_lines(214, "The commands known (the server is read-only):", lines, "Help OK.")

    async def ftp_stat(self, argument: str) -> None:
        if argument:
            self.reply(504, "STAT with an argument is not supported; use LIST.")
            return
        lines = [
            f"Connected from {self.client}",
            "Logged in anonymously" if self.logged_in else "Not logged in",
            "TYPE: BINARY, STRUcture: File, MODE: Stream",
            "A transfer is running" if self.transferring else "No transfer running",
        ]
        self.reply_lines(211, "tend ftp status:", lines, "End of status.")

    async def ftp_auth(self, argument: str) -> None:
        self.reply(502, "TLS is not supported: this is plain FTP.")

    async def ftp_clnt(self, argument: str) -> None:
        self.reply(200, "Noted.")

    async def ftp_abor(self, argument: str) -> None:
        # RFC 959: with the transfer already over, ABOR just closes what is open, and says 226.
        self.forget_data()
        self.reply(226, "ABOR successful; no transfer was running.")

    async def ftp_allo(self, argument: str) -> None:
        self.reply(202, "No storage allocation necessary.")

    # -- the commands: navigation and parameters

    async def ftp_pwd(self, argument: str) -> None:
        quoted = self.cwd.replace('"', '""')
        self.reply(257, f'"{quoted}" is the current folder.')

    async def ftp_cwd(self, argument: str) -> None:
        if not argument:
            raise Refused(501, "Syntax error: CWD needs a folder.")
        entry = await self.find_folder(argument)
        if not os.access(entry.real, os.X_OK):
            raise Refused(550, f"{entry.virtual}: Permission denied.")
        self.cwd = entry.virtual
        self.reply(250, f"Folder changed to {self.cwd}.")

    async def ftp_cdup(self, argument: str) -> None:
        await self.ftp_cwd("..")

    async def ftp_type(self, argument: str) -> None:
        # Files are sent as they are in both types, as on every Unix server.
        kind = " ".join(argument.upper().split())
        if kind in ("A", "A N"):
            self.reply(200, "Type set to A.")
        elif kind in ("I", "L 8"):
            self.reply(200, "Type set to I.")
        else:
            self.reply(504, "Only TYPE A and TYPE I are supported.")

    async def ftp_mode(self, argument: str) -> None:
        if argument.upper() == "S":
            self.reply(200, "Mode set to S.")
        else:
            self.reply(504, "Only MODE S (stream) is supported.")

    async def ftp_stru(self, argument: str) -> None:
        if argument.upper() == "F":
            self.reply(200, "Structure set to F.")
        else:
            self.reply(504, "Only STRU F (file) is supported.")

    async def ftp_rest(self, argument: str) -> None:
        if not (argument.isascii() and argument.isdigit() and len(argument) <= 19):
            raise Refused(501, "Syntax error: REST needs a byte offset.")
        self.rest = int(argument)
        self.reply(350, f"Restarting at {self.rest}; send RETR.")

    # -- the commands: data connections

    async def ftp_pasv(self, argument: str) -> None:
        if self.epsv_all:
            raise Refused(503, "EPSV ALL is in effect; use EPSV.")
        if self.data_family != socket.AF_INET:
            raise Refused(425, "PASV works over IPv4 only; use EPSV.")
        port = self.open_passive()
        numbers = self.local_host.replace(".", ",")
        self.reply(227, f"Entering Passive Mode ({numbers},{port >> 8},{port & 0xFF}).")

    async def ftp_epsv(self, argument: str) -> None:
        if argument.upper() == "ALL":
            self.epsv_all = True
            self.reply(200, "EPSV ALL ok: only EPSV from now on.")
            return
        wanted = "2" if self.data_family == socket.AF_INET6 else "1"
        if argument and argument != wanted:
            raise Refused(522, f"Network protocol not supported, use ({wanted}).")
        port = self.open_passive()
        self.reply(229, f"Entering Extended Passive Mode (|||{port}|).")

    def open_passive(self) -> int:
        """Open a passive port for the next transfer; return its number."""
        self.forget_data()
        try:
            sock = listen_passive(
                self.data_family, self.local_address(), self.settings.passive_ports
            )
        except DataError as error:
            raise Refused(425, f"Cannot open a passive port: {error}.") from None
        except OSError as error:
            raise Refused(425, f"Cannot open a passive port: {error.strerror}.") from None
        self.passive = PassivePort(sock, self.peer, self.settings.data_timeout, self.client)
        return self.passive.port

    def local_address(self) -> tuple[object, ...]:
        """The control connection's local address, to bind a data socket to (port 0)."""
        if self.data_family == socket.AF_INET:
            return (self.local_host, 0)
        return (self.local[0], 0, *self.local[2:])

    async def ftp_port(self, argument: str) -> None:
        self.check_active("PORT")
        numbers = argument.split(",")
        if len(numbers) != 6 or not all(
            part.isascii() and part.isdigit() and int(part) <= 255 for part in numbers
        ):
            raise Refused(501, "Syntax error: PORT h1,h2,h3,h4,p1,p2.")
        host = ".".join(str(int(part)) for part in numbers[:4])
        port = int(numbers[4]) * 256 + int(numbers[5])
        self.set_active("PORT", host, port)

    async def ftp_eprt(self, argument: str) -> None:
        self.check_active("EPRT")
        fields = argument[1:].split(argument[:1]) if argument else []
        if (
            len(fields) != 4
            or fields[3]
            or fields[0] not in ("1", "2")
            or not (fields[2].isascii() and fields[2].isdigit() and int(fields[2]) <= 65535)
        ):
            raise Refused(501, "Syntax error: EPRT |1|h.h.h.h|port| or |2|h::h|port|.")
        try:
            address = ipaddress.ip_address(fields[1])
        except ValueError:
            raise Refused(501, "Syntax error: EPRT needs an IP address.") from None
        if address.version != (4 if fields[0] == "1" else 6):
            raise Refused(501, "Syntax error: the address is not of the protocol given.")
        self.set_active("EPRT", str(address), int(fields[2]))

    def check_active(self, name: str) -> None:
        if not self.settings.allow_active:
            raise Refused(502, f"{name} is off (active mode needs --allow-active); use PASV.")
        if self.epsv_all:
            raise Refused(503, "EPSV ALL is in effect; use EPSV.")

    def set_active(self, name: str, host: str, port: int) -> None:
        """Connect there for the next transfer, if it is the client itself, above 1023."""
        if normalize(host) != self.peer:
            log.warning(
                "refused %s to %s from %s: not the client's address",
                name,
                format_address((host, port)),
                self.client,
            )
            raise Refused(501, f"{name} refused: data goes only to your own address.")
        if port < 1024:
            log.warning(
                "refused %s to %s from %s: a privileged port",
                name,
                format_address((host, port)),
                self.client,
            )
            raise Refused(501, f"{name} refused: data goes only to ports 1024 and above.")
        self.forget_data()
        self.active = (normalize(host), port)
        self.reply(200, f"{name} command successful.")

    # -- the commands: information

    async def ftp_size(self, argument: str) -> None:
        entry = await self.find(argument)
        if entry.is_folder:
            raise Refused(550, f"{entry.virtual}: not a regular file.")
        self.reply(213, str(entry.status.st_size))

    async def ftp_mdtm(self, argument: str) -> None:
        entry = await self.find(argument)
        self.reply(213, stamp(entry.status.st_mtime))

    async def ftp_mlst(self, argument: str) -> None:
        entry = await self.find(argument)
        facts = facts_of(entry.status, kind_of(entry.status), self.facts)
        self.reply_lines(250, f"Listing {entry.virtual}", [f"{facts} {entry.virtual}"], "End.")

    # -- the commands: transfers

    async def ftp_retr(self, argument: str) -> None:
        offset, self.rest = self.rest, 0
        if self.passive is None and self.active is None:
            raise Refused(425, "Use PASV or EPSV first.")
        entry = await self.find(argument)
        if entry.is_folder:
            raise Refused(550, f"{entry.virtual}: not a regular file.")
        fd = await asyncio.to_thread(self.folder.open, entry)
        size = os.fstat(fd).st_size
        if offset > size:
            os.close(fd)
            raise Refused(554, f"REST {offset} is past the end of the file ({size} bytes).")
        stall = self.settings.data_timeout
        self.start_transfer(
            "RETR",
            entry.virtual,
            f"Opening BINARY mode data connection for {entry.virtual} ({size} bytes).",
            lambda sock, progress: send_file(sock, fd, offset, size - offset, stall, progress),
            lambda: os.close(fd),
        )

    async def ftp_list(self, argument: str) -> None:
        # ls flags (-la, -a) are ignored: every client sends some, none needs them.
        while argument.startswith("-"):
            argument = argument.partition(" ")[2].lstrip(" ")
        entry = await self.find(argument)
        now = time.time()
        if entry.is_folder:
            folder = self.folder

            def build() -> str:
                return "".join(ls_line(name, status, now) for name, status in folder.entries(entry))

        else:
            line = ls_line(posixpath.basename(entry.virtual), entry.status, now)

            def build() -> str:
                return line

        await self.send_listing("LIST", entry.virtual, build)

    async def ftp_nlst(self, argument: str) -> None:
        entry = await self.find(argument)
        if entry.is_folder:
            folder = self.folder

            def build() -> str:
                return "".join(f"{name}\r\n" for name, _ in folder.entries(entry))

        else:
            line = f"{argument}\r\n"

            def build() -> str:
                return line

        await self.send_listing("NLST", entry.virtual, build)

    async def ftp_mlsd(self, argument: str) -> None:
        entry = await self.find_folder(argument)
        folder = self.folder
        chosen = self.facts

        def build() -> str:
            return "".join(
                f"{facts_of(status, kind_of(status), chosen)} {name}\r\n"
                for name, status in folder.entries(entry)
            )

        await self.send_listing("MLSD", entry.virtual, build)


def _strip_telnet(line: bytes) -> bytearray:
    """*line* without Telnet commands (IAC and the byte after it); IAC IAC is a 0xFF."""
    kept = bytearray()
    index = 0
    while index < len(line):
        byte = line[index]
        if byte == 0xFF and index + 1 < len(line):
            if line[index + 1] == 0xFF:
                kept.append(0xFF)
            index += 2
            continue
        kept.append(byte)
        index += 1
    return kept


# -- the service ----------------------------------------------------------------------------


class FTPService(MultiService):
    """The FTP server: its folder, its sessions and their caps, and its listeners as children.

    On stop, sessions waiting for a command are told 421 and closed at once; a running
    transfer finishes (within tend's drain), then its session closes the same way.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.folder = Folder(settings.root)
        self.sessions: set[Session] = set()
        self.per_address: Counter[str] = Counter()
        self.stopping = False

    async def start_service(self) -> None:
        """Check the folder can be served, then start listening."""
        self.folder = await asyncio.to_thread(check_folder, self.settings.root)
        self.stopping = False
        await super().start_service()

    async def stop_service(self) -> None:
        """Close idle sessions, then stop the listeners, which drain the rest."""
        self.stopping = True
        for session in list(self.sessions):
            session.shutdown()
        await super().stop_service()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Run one control connection, unless it is one too many."""
        peer = writer.get_extra_info("peername")
        if not (isinstance(peer, tuple) and writer.get_extra_info("sockname")):
            writer.write(b"421 FTP needs a TCP connection.\r\n")
            writer.close()
            return
        address = normalize(peer[0])
        refusal = None
        if len(self.sessions) >= self.settings.max_clients:
            refusal = f"Too many connections ({self.settings.max_clients}); try again later."
        elif self.per_address[address] >= self.settings.max_clients_per_ip:
            refusal = (
                f"Too many connections from your address ({self.settings.max_clients_per_ip}); "
                "try again later."
            )
        if refusal is not None:
            log.warning("refused an FTP connection from %s: %s", format_address(peer), refusal)
            writer.write(f"421 {refusal}\r\n".encode())
            writer.close()
            return
        try:
            session = Session(self, reader, writer)
        except (OSError, IndexError, TypeError) as error:
            log.warning("cannot start an FTP session: %s", error)
            writer.transport.abort()
            return
        self.sessions.add(session)
        self.per_address[address] += 1
        try:
            await session.run()
        except Exception:
            log.exception("the FTP session of %s failed", session.client)
            writer.transport.abort()
        finally:
            self.sessions.discard(session)
            self.per_address[address] -= 1
            if self.per_address[address] <= 0:
                del self.per_address[address]


def check_folder(root: str) -> Folder:
    """The folder to serve, once checked to be a folder one can list.

    Raises:
        StartupError: it is missing, not a folder, or not readable.
    """
    try:
        status = os.stat(root)
    except OSError as error:
        raise StartupError(f"cannot serve folder {quote(root)}: {error.strerror}") from None
    except ValueError as error:  # a NUL byte
        raise StartupError(f"cannot serve folder {quote(root)}: {error}") from None
    if not stat.S_ISDIR(status.st_mode):
        raise StartupError(f"cannot serve folder {quote(root)}: it is not a folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise StartupError(f"cannot serve folder {quote(root)}: Permission denied")
    return Folder(root)


class FTPFactory:
    """Makes the protocol of each control connection: an asyncio stream for a session."""

    def __init__(self, service: FTPService) -> None:
        self.service = service

    def __call__(self) -> asyncio.BaseProtocol:
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        return asyncio.StreamReaderProtocol(reader, self.service.serve)


class FTPListener(StreamServer):
    """A StreamServer that warns, once bound, when other hosts can reach it."""

    def privileged_start_service(self) -> None:
        super().privileged_start_service()
        warn_if_exposed(self, "anyone who can reach it can read the folder, in clear text", log)


# -- the plugin -----------------------------------------------------------------------------

_LISTEN_HELP = (
    "A port or TCP endpoint to listen on; give it again to listen on more (a bare port "
    "listens on --iface)."
)


class FTPMaker(ServiceMaker):
    name = "ftp"
    description = "Read-only anonymous FTP of one folder (plain FTP, no TLS)."
    epilog = (
        "Plain FTP: names, files and the anonymous password cross the network in clear\n"
        "text, so it listens on loopback unless told otherwise. Read-only: commands that\n"
        "write answer 550."
    )
    options = (
        Option(
            "listen",
            "p",
            "2121",
            _LISTEN_HELP,
            type=listen_endpoint,
            metavar="ENDPOINT",
            repeatable=True,
        ),
        Option("iface", None, "127.0.0.1", "The interface a bare --listen port is on."),
        Option("root", "r", ".", "The folder to serve.", path=True),
        Flag(
            "allow-active",
            None,
            "Accept PORT and EPRT (active mode), to the client's own address and ports "
            "1024 and above only.",
        ),
        Option(
            "passive-ports",
            None,
            None,
            "Passive data ports, LOW-HIGH (default: any free port).",
            type=port_range,
            metavar="LOW-HIGH",
        ),
        Option(
            "login-timeout",
            None,
            "30",
            "Seconds a client has to log in after connecting.",
            type=positive_seconds,
        ),
        Option(
            "idle-timeout",
            None,
            "300",
            "Seconds a logged-in client may stay silent between commands.",
            type=positive_seconds,
        ),
        Option(
            "data-timeout",
            None,
            "30",
            "Seconds to wait for a data connection, and for a transfer that makes no progress.",
            type=positive_seconds,
        ),
        Option(
            "max-clients",
            None,
            "64",
            "Control connections at once; more are answered 421.",
            type=positive_count,
        ),
        Option(
            "max-clients-per-ip",
            None,
            "16",
            "Control connections at once from one address; more are answered 421.",
            type=positive_count,
        ),
    )

    def make_service(self, options: Mapping[str, object]) -> Service:
        settings = Settings(
            root=str(options["root"]),
            allow_active=bool(options["allow_active"]),
            passive_ports=_ports(options.get("passive_ports")),
            login_timeout=_float(options["login_timeout"]),
            idle_timeout=_float(options["idle_timeout"]),
            data_timeout=_float(options["data_timeout"]),
            max_clients=int(str(options["max_clients"])),
            max_clients_per_ip=int(str(options["max_clients_per_ip"])),
        )
        service = FTPService(settings)
        factory = FTPFactory(service)
        listens = options["listen"]
        if not isinstance(listens, list):
            raise TypeError(f"--listen: expected a list of endpoints, not {listens!r}")
        for endpoint in dict.fromkeys(str(listen) for listen in listens):
            listener = FTPListener(endpoint, factory, default_interface=str(options["iface"]))
            listener.set_service_parent(service)
        return service


def _ports(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        return (int(value[0]), int(value[1]))
    return port_range(str(value))


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) else float(str(value))


service_maker = FTPMaker()
