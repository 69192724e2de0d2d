"""tend manhole: a Python console inside the running tend, on a UNIX socket only.

``tend manhole --socket PATH`` runs a `ManholeService`: an asyncio REPL, with top-level
``await``, in the event loop of the worker it runs in. ``socat - UNIX-CONNECT:PATH`` (with
``rlwrap`` in front for line editing), or ``nc -NU PATH``, reaches it. The same
service can be added to any tree (``ManholeService(path).set_service_parent(application)``),
which is what the runner's ``--console PATH`` is meant to do.

Where the socket is:

- Each worker has its own loop, tasks and memory, so each has its own console: worker 1 (or
  the only one) listens on PATH, worker N > 1 on ``PATH.N`` (`console_path`). A service that
  does not know its worker's number (``worker=None``, as the plugin cannot tell it today)
  listens on PATH.
- The socket is bound in the worker, when the service starts, so after tend has dropped
  privileges: the socket belongs to the user the worker runs as, who (with root) may use it.
- Its folder must be that user's own and closed to group and others: tend makes it, mode
  0700, if it is missing (one level, never its parents), and refuses one that is group- or
  other-accessible, or someone else's, or not a folder. The socket is made mode 0600 from
  the moment it exists (bound under the umask ``tend.UNIXServer(..., mode=0o600)`` sets),
  never chmod-ed after, and checked once bound: the file reached by PATH must be the one
  just bound in the folder just checked.
- A socket file already at PATH (a killed tend's, or that of the generation a reload or an
  upgrade is replacing) is removed and PATH bound again; any other kind of file is refused.

Who may use it: a peer whose uid, read with ``SO_PEERCRED`` at accept, is 0 or the worker's
effective uid. Others are told so in one line and closed; so is a peer past the cap on
sessions. One access line per session names the peer's uid and pid, how long the session
lasted and how it ended; never what was typed.

A session reads lines (at most `LONGEST_LINE` bytes each), compiles them as the interactive
interpreter would (``codeop``, with ``ast.PyCF_ALLOW_TOP_LEVEL_AWAIT``; ``... `` asks for
more) and runs them in a task of its own on the worker's loop. Nothing it does goes through
the process's ``sys.stdout`` or ``sys.displayhook``: ``print`` in the session's namespace
writes to the session, expression statements are shown by the session's own display (their
``repr``, kept in ``_``), tracebacks of the session's code go to the session. The session
yields to the loop after each line, and reads no more input while the client has
`OUTPUT_LIMIT` bytes of output unread; what one command prints past that is dropped (and
counted). A statement is capped at `LONGEST_STATEMENT_LINES` lines and `LONGEST_STATEMENT`
bytes. A session that has sent no line (or read nothing) for the idle timeout is closed;
closing a session cancels what it runs.

Stays out of: the process's standard streams and hooks, signal handlers (``stop()`` sends
SIGTERM to the supervisor, whose own handler does the rest), and anything of tend's that
``tend/__init__.py`` does not export.
"""

from __future__ import annotations
import __future__

import argparse
import ast
import asyncio
import codeop
import contextlib
import inspect
import logging
import os
import re
import select
import signal
import socket
import stat
import struct
import sys
import traceback
import types
from collections.abc import Iterator, Mapping
from typing import Protocol, cast

from tend import (
    AccessLog,
    Option,
    Service,
    ServiceMaker,
    StartupError,
    UNIXServer,
    __version__,
    current_worker,
    positive_seconds,
    quote,
    walk,
)
from tend.builtins.common import whole_number

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_SESSIONS",
    "ManholeFactory",
    "ManholeService",
    "console_path",
    "console_socket",
    "service_maker",
]

log = logging.getLogger(__name__)
access = AccessLog(__name__)

# A session waiting this long for input is closed: a console left open in a forgotten
# terminal should not hold a slot, or the worker's memory, for ever.
DEFAULT_IDLE_TIMEOUT = 600.0

# Sessions one worker holds at once. A console is for a person or two, not for load.
DEFAULT_MAX_SESSIONS = 4

# The longest line read; past it the line is discarded (and said so) up to its newline.
LONGEST_LINE = 64 * 1024

# The most input held unread; past it, reading pauses until the session catches up.
LONGEST_INPUT = 1024 * 1024

# The longest statement, in lines and in bytes. Each line typed compiles the statement so
# far again, on the worker's loop, so the cost of one grows as lines times bytes: these
# bound it near a second, where a pasted 400,000-line literal took ten minutes.
LONGEST_STATEMENT_LINES = 1000
LONGEST_STATEMENT = 128 * 1024

# Output a client has not read yet, past which more is dropped until it reads.
OUTPUT_LIMIT = 1024 * 1024

# How long sessions get to close when the service stops, before they are reset.
CLOSE_GRACE = 2.0

# How long a refused peer has to read why, before its connection is reset.
REFUSAL_GRACE = 1.0

# The longest PATH, in bytes: a UNIX socket's path holds 107, and worker N's is PATH.N.
LONGEST_PATH = 100

FILENAME = "<console>"
PS1 = ">>> "
PS2 = "... "

# The compile flags a session keeps: top-level await, and the __future__ features typed.
_FUTURE_FLAGS = 0
for _feature in __future__.all_feature_names:
    _FUTURE_FLAGS |= getattr(__future__, _feature).compiler_flag
_COMPILE_FLAGS = _FUTURE_FLAGS | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT

# Where the session's display lives in its namespace: the expression statements typed are
# rewritten to call it, since sys.displayhook is the whole process's.
_DISPLAY = "__console_display__"

_ENDPOINT_KIND = re.compile(r"(tcp|tls|ssl|systemd|unix):", re.IGNORECASE)
_UNIX_ONLY = "the console listens only on a UNIX socket: give a path, such as console/tend.sock"

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid

HELP = """\
This console runs Python inside tend's worker (pid {pid}), on its event loop: `await`
works at the top level, and code that blocks (time.sleep, a long loop) blocks every
service of this worker until it ends. Closing the session cancels what it runs.

  application   the root of the service tree: len(application), list(application)
  services      every service in the tree, parents first (tend.walk)
  loop          this worker's event loop
  tasks()       this worker's asyncio tasks and where each waits; tasks(False): names only
  stop()        stop tend gracefully: SIGTERM to its supervisor, as `tendctl stop` would
  console       a file that writes here: pprint.pprint(x, stream=console)
  print(...)    writes here; nothing typed here writes to tend's own output
  help(thing)   thing's documentation
  exit()        leave the console (Ctrl-D does too); tend goes on
"""


def console_path(path: str, worker: int | None) -> str:
    """The socket of worker *worker*'s console: *path* for worker 1 (or None), else PATH.N."""
    return path if worker is None or worker == 1 else f"{path}.{worker}"


def path_problem(path: str) -> str | None:
    """What is wrong with *path* (absolute) as a console's socket, or None if nothing.

    Each answer fits the one line of 200 characters a user reads, after tend's own prefix.
    """
    shown = quote(path, 50)
    if "\0" in path:
        return f"invalid socket path {shown}: it holds a NUL character"
    parts = path.split("/")
    for part in parts:
        kind = _ENDPOINT_KIND.match(part)
        if kind is not None and kind.group(1).lower() == "unix":
            return f"invalid socket path {shown}: give the path alone, without 'unix:'"
        if kind is not None:
            return f"{quote(part, 30)} is an endpoint; {_UNIX_ONLY}"
    if parts[-1].isdigit():
        return f"{quote(parts[-1], 20)} is a port; {_UNIX_ONLY}"
    if not parts[-1] or os.path.isdir(path):
        return f"invalid socket path {shown}: it is a folder; add the socket's name"
    size = len(os.fsencode(path))
    if size > LONGEST_PATH:
        return f"invalid socket path {shown}: {size} bytes, over {LONGEST_PATH}; use a shorter one"
    return None


def console_socket(text: str) -> str:
    """``--socket``'s converter: a file path, made absolute; never a TCP or TLS endpoint."""
    path = os.path.abspath(text) if text else text
    problem = path_problem(path) if path else "expected a file path, such as console/tend.sock"
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return path


# ``--max-sessions``: a whole number from 1 to 1000.
session_count = whole_number(1, 1000, "session count")


class ManholeService(Service):
    """A console on the UNIX socket *path*, in the event loop of the worker running the tree.

    *namespace* adds names to each session's namespace (a fresh copy per session), over
    ``application``, ``services``, ``loop`` and ``asyncio``; the session's own helpers
    (``print``, ``help``, ``tasks``, ``stop``, ``exit``, ``console``) come last. *worker*
    is the number of the worker (from 1) the tree runs in, if known: worker N > 1 listens
    on ``PATH.N`` (`console_path`).

    Raises:
        StartupError: *path* cannot be a console's socket (see `path_problem`).
    """

    def __init__(
        self,
        path: str,
        namespace: Mapping[str, object] | None = None,
        *,
        worker: int | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        # Absolute now: the daemon changes to its rundir before the service starts.
        self.path = os.path.abspath(path)
        problem = path_problem(self.path)
        if problem is not None:
            raise StartupError(problem)
        self.namespace = dict(namespace or {})
        self.worker = worker
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self._server: UNIXServer | None = None
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisor_pid: int | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.socket_path}>"

    @property
    def socket_path(self) -> str:
        """Where this worker's console listens: *worker* if given, else the worker this
        process is (`tend.current_worker`)."""
        return console_path(self.path, self.worker if self.worker is not None else current_worker())

    @property
    def session_count(self) -> int:
        """How many sessions are open now."""
        return len(self._sessions)

    def privileged_start_service(self) -> None:
        """Note which process runs the tree: the one ``stop()`` signals.

        Under tend this is the supervisor, before it forks the workers; a program that runs
        a tree in one process privileged-starts and starts it in that same process.
        """
        self._supervisor_pid = os.getpid()
        super().privileged_start_service()

    async def start_service(self) -> None:
        """Make or check the folder, bind the socket 0600 in it, and accept sessions."""
        server = _bind(self.socket_path, ManholeFactory(self))
        try:
            await server.start_service()
        except BaseException:
            server.stop_listening()
            raise
        self._server = server
        await super().start_service()

    async def stop_service(self) -> None:
        """Stop accepting, cancel what sessions run, tell them and close them."""
        await super().stop_service()
        server, self._server = self._server, None
        if server is None:
            return
        server.stop_listening()
        for session in list(self._sessions):
            session.close("tend is stopping; closing this console")
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_GRACE)
        await server.drain(asyncio.get_running_loop().time() + CLOSE_GRACE)

    def request_stop(self) -> str:
        """Send SIGTERM to the supervisor (the process that runs this tree); say how it went.

        A worker's SIGTERM would only have it replaced, so the supervisor is the one to ask;
        it is this process's parent, and noted by `privileged_start_service`. Nothing is
        signalled unless that pid is still the parent (or this process): a pid whose
        process has gone may already name another.
        """
        target = self._supervisor_pid
        if target is None:
            return (
                "cannot tell which process runs this tree (its privileged start never ran); "
                "stop tend with `tendctl stop` or kill"
            )
        if target not in (os.getpid(), os.getppid()):
            return f"tend's supervisor (pid {target}) is gone; nothing was signalled"
        try:
            os.kill(target, signal.SIGTERM)
        except PermissionError:
            return (
                f"this worker (uid {os.geteuid()}) may not signal tend's supervisor "
                f"(pid {target}), which runs as another user; run `kill -TERM {target}` "
                "or `tendctl stop` as that user"
            )
        except ProcessLookupError:
            return f"tend's supervisor (pid {target}) is gone; nothing was signalled"
        log.info("the console asked tend's supervisor (pid %d) to stop", target)
        return (
            f"sent SIGTERM to tend's supervisor (pid {target}): tend stops gracefully, "
            "and this console closes as it does"
        )

    def _namespace_for(self, session: _Session) -> dict[str, object]:
        root: Service = self
        while root.parent is not None:
            root = root.parent
        namespace: dict[str, object] = {
            "__name__": "__console__",
            "__doc__": None,
            "asyncio": asyncio,
            "application": root if root is not self else None,
            "services": list(walk(root)),
            "loop": asyncio.get_running_loop(),
        }
        namespace.update(self.namespace)
        namespace.update(
            {
                "print": session.print,
                "help": session.help,
                "tasks": session.tasks,
                "stop": session.stop,
                "exit": session.exit,
                "quit": session.exit,
                "console": session.console,
                _DISPLAY: session.display,
            }
        )
        return namespace

    def _admit(self, session: _Session) -> bool:
        if len(self._sessions) >= self.max_sessions:
            return False
        self._sessions.add(session)
        task = asyncio.get_running_loop().create_task(session.run())
        self._tasks.add(task)
        session.task = task
        task.add_done_callback(self._session_done)
        return True

    def _session_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("a console session failed", exc_info=error)

    def _forget(self, session: _Session) -> None:
        self._sessions.discard(session)


class ManholeFactory:
    """Makes a console session for each connection to a `ManholeService`."""

    def __init__(self, service: ManholeService) -> None:
        self.service = service

    def __call__(self) -> asyncio.Protocol:
        return _Session(self.service)


def _bind(path: str, factory: ManholeFactory) -> UNIXServer:
    """Bind *path* mode 0600 in a folder of this user's, closed to others (see the module).

    Raises:
        StartupError: the folder cannot be made, or is not private, or *path* holds a file
            that is not a socket, or the socket cannot be bound as it should be.
    """
    folder, name = os.path.split(path)
    made = False
    try:
        os.mkdir(folder, 0o700)
        made = True
    except FileExistsError:
        pass
    except OSError as error:
        raise StartupError(
            f"cannot make the console's folder {quote(folder, 60)}: {error.strerror}"
        ) from None
    try:
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise StartupError(
                f"cannot use {quote(folder, 60)} for the console: {error.strerror}"
            ) from None
        try:
            _check_private(folder, os.fstat(fd))
            _clear(path, name, fd)
            server = UNIXServer(path, factory, mode=0o600)
            server.listen()
            try:
                _check_bound(path, name, fd)
            except BaseException:
                server.stop_listening()
                raise
            return server
        finally:
            os.close(fd)
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def _check_private(folder: str, status: os.stat_result) -> None:
    uid = os.geteuid()
    if status.st_uid != uid:
        raise StartupError(
            f"cannot use {quote(folder, 60)} for the console: it belongs to uid "
            f"{status.st_uid}, not to uid {uid}, tend's worker; it must be the worker's, mode 0700"
        )
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        raise StartupError(
            f"cannot use {quote(folder, 60)} for the console: group or others may enter it "
            f"(mode {mode:04o}); chmod 700 it, or name a folder tend may make, as console/tend.sock"
        )


def _clear(path: str, name: str, folder: int) -> None:
    """Remove a socket file at *path* (in *folder*); refuse any other kind of file."""
    try:
        status = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as error:
        raise StartupError(f"cannot listen on {quote(path, 60)}: {error.strerror}") from None
    if not stat.S_ISSOCK(status.st_mode):
        raise StartupError(
            f"cannot listen on {quote(path, 60)}: something other than a socket is there; "
            "tend replaces only a socket"
        )
    listener = _listener_of(path)
    if listener is not None and not _same_tend(listener):
        raise StartupError(
            f"cannot listen on {quote(path, 60)}: another process (pid {listener}) listens "
            "on it; stop it, or give this tend a console path of its own"
        )
    try:
        os.unlink(name, dir_fd=folder)
    except FileNotFoundError:
        return
    except OSError as error:
        raise StartupError(
            f"cannot remove the socket at {quote(path, 60)}: {error.strerror}"
        ) from None
    log.info(
        "replaced the socket at %s (a stopped tend's, or a generation being replaced)",
        quote(path, 120),
    )


def _listener_of(path: str) -> int | None:
    """The pid of the process listening on the UNIX socket at *path*; None if none does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
            credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
        except OSError:  # refused: a stale file; or gone meanwhile
            return None
    pid: int = _CREDENTIALS.unpack(credentials)[0]
    return pid


def _same_tend(pid: int) -> bool:
    """Whether *pid* is a worker of this worker's supervisor (an older generation being
    replaced), or of the supervisor that one is upgrading from."""
    if _parent_of(os.getpid()) is None:  # no /proc here (a chroot): replace, as before
        return True
    supervisor = os.getppid()
    parent = _parent_of(pid)
    return parent is not None and parent in (supervisor, _parent_of(supervisor))


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            fields = stat_file.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1])


def _check_bound(path: str, name: str, folder: int) -> None:
    """The socket just bound is in the folder checked, 0600, ours, and what *path* reaches."""
    try:
        here = os.stat(name, dir_fd=folder, follow_symlinks=False)
        there = os.stat(path)
    except OSError as error:
        raise StartupError(
            f"cannot check the socket at {quote(path, 60)}: {error.strerror}"
        ) from None
    if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino) or not stat.S_ISSOCK(
        here.st_mode
    ):
        raise StartupError(
            f"cannot listen on {quote(path, 60)}: its folder changed while tend bound the socket"
        )
    mode = stat.S_IMODE(here.st_mode)
    if mode != 0o600 or here.st_uid != os.geteuid():
        raise StartupError(
            f"cannot listen on {quote(path, 60)}: the socket was made mode {mode:04o} for uid "
            f"{here.st_uid}, not 0600 for uid {os.geteuid()}"
        )


def peer_credentials(transport: asyncio.BaseTransport) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise OSError("no socket")
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    pid, uid, _ = _CREDENTIALS.unpack(data)
    return pid, uid


def _peer_closed(transport: asyncio.BaseTransport) -> bool:
    """Whether the peer closed its socket, rather than only ending what it sends.

    A UNIX socket whose peer has closed polls POLLHUP; after the peer's shutdown(SHUT_WR)
    (socat and ``nc -N`` at the end of their input) it polls only readable.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


class _Writable(Protocol):
    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


class _SessionExit(Exception):
    """exit(), quit() or SystemExit in the session's code: the session ends, tend goes on."""


class _Console:
    """A file that writes to one session: ``pprint.pprint(x, stream=console)``."""

    def __init__(self, session: _Session) -> None:
        self._session = session

    def __repr__(self) -> str:
        return "<console: a file that writes to this session>"

    def write(self, text: str) -> int:
        self._session.write(str(text))
        return len(text)

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True


class _Session(asyncio.Protocol):
    """One peer: checks it, reads its lines, runs what they say, writes what comes out."""

    def __init__(self, service: ManholeService) -> None:
        self.service = service
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.console = _Console(self)
        self.namespace: dict[str, object] = {}
        self.pid = self.uid = -1
        self.opened = 0.0
        self.ending = "the client left"
        self.refused: str | None = None
        # Input: the bytes received and not yet read as lines, at most about LONGEST_INPUT
        # (reading pauses past it), and whether the line being read is too long to keep.
        self.inbox = bytearray()
        self.discarding = False
        self.reading_paused = False
        self.input_ended = False
        self.arrived = asyncio.Event()
        # Output: whether the client is behind, what was dropped, the prompt last shown.
        self.writing_paused = False
        self.caught_up = asyncio.Event()  # set while the client keeps up with the output
        self.caught_up.set()
        self.dropped = 0
        self.prompt = ""

    # -- the connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transports are read-write (uvloop's are not asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self.opened = asyncio.get_running_loop().time()
        try:
            self.pid, self.uid = peer_credentials(transport)
        except OSError as error:
            self._refuse(f"cannot tell who is connecting: {error}")
            return
        if self.uid not in (0, os.geteuid()):
            self._refuse(f"uid {self.uid} may not use this console")
            return
        self.transport.set_write_buffer_limits(high=OUTPUT_LIMIT)
        if not self.service._admit(self):
            self._refuse(
                f"too many console sessions ({self.service.max_sessions}); try again later"
            )

    def _refuse(self, reason: str) -> None:
        """Say *reason* and end the connection, reading (and ignoring) what the peer sends
        meanwhile, so that a client already typing reads the reason, not a broken pipe."""
        self.refused = reason
        transport = self.transport
        assert transport is not None
        transport.write(f"tend: {reason}\n".encode())
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        asyncio.get_running_loop().call_later(REFUSAL_GRACE, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.task is None:
            return
        self.inbox += data
        self.arrived.set()
        if len(self.inbox) > LONGEST_INPUT and not self.reading_paused:
            assert self.transport is not None
            self.reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.task is None:  # refused, and the peer has read that
            return False
        if self.transport is not None and _peer_closed(self.transport):
            # Gone altogether, not just done sending: what it left running is cancelled.
            self.transport.abort()
            return True
        self.input_ended = True
        self.arrived.set()
        return True  # keep writing: the answers to what was sent before the end are due

    def connection_lost(self, exc: Exception | None) -> None:
        self.input_ended = True
        self.arrived.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.service._forget(self)
        duration = asyncio.get_running_loop().time() - self.opened
        if self.refused is not None:
            access.warning("console refused uid %d, pid %d: %s", self.uid, self.pid, self.refused)
        else:
            access.info(
                "console session of uid %d, pid %d: %.1f s, %s",
                self.uid,
                self.pid,
                duration,
                self.ending,
            )

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.caught_up.clear()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.caught_up.set()
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            self.write(f"\n[{dropped} bytes of output dropped: the client was not reading them]\n")
            if self.prompt:
                self.write(self.prompt)

    def close(self, why: str) -> None:
        """Say *why* and close; what is unsent still goes, within the stop's grace."""
        if self.transport is not None and not self.transport.is_closing():
            self.ending = why
            self.write(f"\n{why}\n")
            self.transport.close()

    def write(self, text: str) -> None:
        """Send *text* to the client, unless it is too far behind: then count it dropped."""
        if self.transport is None or self.transport.is_closing():
            return
        data = text.encode("utf-8", "backslashreplace")
        if self.writing_paused:
            self.dropped += len(data)
            return
        self.transport.write(data)

    # -- the loop of the session ---------------------------------------------------------

    async def run(self) -> None:
        try:
            self.namespace = self.service._namespace_for(self)
            self.write(self._banner())
            await self._read_eval_print()
        finally:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    def _banner(self) -> str:
        worker = "" if self.service.worker is None else f" (worker {self.service.worker})"
        count = len(asyncio.all_tasks())
        return (
            f"tend {__version__} console in pid {os.getpid()}{worker}, "
            f"Python {sys.version.split()[0]}, {count} task{'s' if count != 1 else ''}.\n"
            "help() says what is here; exit() or Ctrl-D leaves, and tend goes on.\n"
        )

    async def _read_eval_print(self) -> None:
        compiler = codeop.CommandCompiler()
        compiler.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        lines: list[str] = []
        while True:
            # Let the loop run between lines, so that the worker's other services run
            # and the output flows, even while the client sends a long paste.
            await asyncio.sleep(0)
            self.prompt = PS2 if lines else PS1
            self.write(self.prompt)
            try:
                async with asyncio.timeout(self.service.idle_timeout):
                    # Nothing more is read until the client has read what came out: so
                    # what a paste makes is never dropped, only what one command prints.
                    await self.caught_up.wait()
                    line = await self._next_line()
            except TimeoutError:
                self.close(f"closing: idle for {self.service.idle_timeout:g} s")
                self.ending = "idle timeout"
                return
            except EOFError:
                self.ending = "end of input"
                return
            self.prompt = ""
            if line is not None and not lines and not line.strip():
                continue  # a blank line at the prompt: the prompt again, as python's
            if line is None:
                self.write(f"line too long (over {LONGEST_LINE} bytes): input discarded\n")
                lines = []
                continue
            lines.append(line)
            source = "\n".join(lines)
            if len(lines) > LONGEST_STATEMENT_LINES or len(source) > LONGEST_STATEMENT:
                self.write(
                    f"statement too long (over {LONGEST_STATEMENT_LINES} lines or "
                    f"{LONGEST_STATEMENT} bytes): discarded; import it from a file instead\n"
                )
                lines = []
                continue
            try:
                code = compiler(source, FILENAME, "single")
            except Exception as error:  # SyntaxError, and the parser's Recursion/MemoryError
                self._show(error, compiling=True)
                lines = []
                continue
            if code is None:
                continue
            lines = []
            try:
                await self._execute(source, compiler.compiler.flags & _COMPILE_FLAGS)
            except _SessionExit:
                self.ending = "exit()"
                return

    async def _next_line(self) -> str | None:
        """The next line, without its end; None for one too long (discarded whole).

        Raises:
            EOFError: the client has sent its last line.
        """
        while True:
            whole, line = self._take_line()
            if whole:
                return line
            if self.input_ended:
                raise EOFError
            self.arrived.clear()
            await self.arrived.wait()

    def _take_line(self) -> tuple[bool, str | None]:
        """(True, line) for the next whole line in the inbox, (True, None) for one too long,
        (False, None) while the next line is not whole yet."""
        inbox = self.inbox
        try:
            if not self.discarding:
                newline = inbox.find(b"\n", 0, LONGEST_LINE + 1)
                last = self.input_ended and 0 < len(inbox) <= LONGEST_LINE
                if newline >= 0 or last:
                    end = newline if newline >= 0 else len(inbox)
                    line = inbox[:end].decode("utf-8", "replace").removesuffix("\r")
                    del inbox[: end + 1]
                    return True, line
                if len(inbox) <= LONGEST_LINE:
                    return False, None
                self.discarding = True
            newline = inbox.find(b"\n")
            if newline < 0 and not self.input_ended:
                inbox.clear()
                return False, None
            del inbox[: len(inbox) if newline < 0 else newline + 1]
            self.discarding = False
            return True, None
        finally:
            if self.reading_paused and len(inbox) <= LONGEST_INPUT // 2:
                assert self.transport is not None
                self.reading_paused = False
                self.transport.resume_reading()

    async def _execute(self, source: str, flags: int) -> None:
        """Run *source* as the interactive interpreter would, showing expression values."""
        try:
            tree = compile(source, FILENAME, "exec", flags | ast.PyCF_ONLY_AST, dont_inherit=True)
            tree = ast.fix_missing_locations(_Displayed().visit(tree))
            code = compile(tree, FILENAME, "exec", flags, dont_inherit=True)
        except Exception as error:  # as above: what was typed cannot be compiled
            self._show(error, compiling=True)
            return
        try:
            result = types.FunctionType(code, self.namespace)()
            if inspect.iscoroutine(result):
                await result
        except SystemExit:
            raise _SessionExit from None
        except _SessionExit:
            raise
        except asyncio.CancelledError as error:
            if self.transport is None or self.transport.is_closing():
                raise  # the session is closing: this is its end
            # The code typed cancelled this session's own task: an error like another.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self._show(error)
        except BaseException as error:
            self._show(error)

    def _show(self, error: BaseException, *, compiling: bool = False) -> None:
        """Write *error*'s traceback to the session, from the session's code down; for
        what could not be compiled, the error alone (the compiler's frames are not news)."""
        if compiling:
            self.write("".join(traceback.format_exception_only(type(error), error)))
            return
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        self.write("".join(traceback.format_exception(type(error), error, tb)))

    # -- what the session's namespace offers ---------------------------------------------

    def display(self, value: object) -> None:
        """Show an expression statement's value, as sys.displayhook would, to this session."""
        if value is None:
            return
        self.namespace["_"] = value
        self.write(repr(value) + "\n")

    def print(
        self,
        *values: object,
        sep: str | None = " ",
        end: str | None = "\n",
        file: _Writable | None = None,
        flush: bool = False,
    ) -> None:
        """print() for the session: to this session unless *file* names another file."""
        text = (" " if sep is None else sep).join(str(value) for value in values)
        text += "\n" if end is None else end
        if file is None or file is sys.stdout or file is self.console:
            self.write(text)
            return
        file.write(text)
        if flush:
            file.flush()

    def help(self, *thing: object) -> None:
        """Say what the console offers; help(thing): thing's documentation."""
        if not thing:
            self.write(HELP.format(pid=os.getpid()))
            return
        import pydoc

        self.write(pydoc.plain(pydoc.render_doc(thing[0])) + "\n")

    def exit(self, code: object = None) -> None:
        """Leave the console; tend goes on."""
        raise _SessionExit

    def stop(self) -> None:
        """Stop tend gracefully: SIGTERM to its supervisor."""
        self.write(self.service.request_stop() + "\n")

    def tasks(self, stacks: bool = True) -> None:
        """List this worker's asyncio tasks and, with *stacks*, where each one waits."""
        current = asyncio.current_task()
        found = sorted(asyncio.all_tasks(), key=lambda task: task.get_name())
        out = [f"{len(found)} task{'s' if len(found) != 1 else ''} in pid {os.getpid()}:\n"]
        for task in found:
            coroutine = task.get_coro()
            what = getattr(coroutine, "__qualname__", type(coroutine).__name__)
            label = f"{task.get_name()}: {what}"
            if task.cancelling():
                label += " (cancelling)"
            if task is current:
                out.append(f"{label} (this console, listing the tasks)\n")
                continue
            out.append(label + "\n")
            if stacks:
                frames = [(frame, frame.f_lineno) for frame in _awaiting(coroutine)]
                for entry in traceback.StackSummary.extract(iter(frames)).format():
                    out.append("".join(f"  {line}\n" for line in entry.rstrip("\n").split("\n")))
        self.write("".join(out))


class _Displayed(ast.NodeTransformer):
    """Show the value of each expression statement outside functions and classes.

    What the interactive interpreter shows (``for i in range(2): i`` shows 0 and 1), by a
    call to the session's display rather than through the process's sys.displayhook.
    """

    def visit_Expr(self, node: ast.Expr) -> ast.Expr:
        call = ast.Call(ast.Name(_DISPLAY, ast.Load()), [node.value], [])
        return ast.copy_location(ast.Expr(call), node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        return node

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AsyncFunctionDef:
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        return node


def _awaiting(coroutine: object) -> Iterator[types.FrameType]:
    """The frames of *coroutine* and of what it awaits, outermost first."""
    seen = 0
    while coroutine is not None and seen < 100:
        seen += 1
        frame = None
        for attribute in ("cr_frame", "gi_frame", "ag_frame"):
            frame = getattr(coroutine, attribute, None)
            if frame is not None:
                break
        if frame is None:
            return
        yield frame
        coroutine = next(
            (
                getattr(coroutine, attribute)
                for attribute in ("cr_await", "gi_yieldfrom", "ag_await")
                if getattr(coroutine, attribute, None) is not None
            ),
            None,
        )


class ManholeMaker(ServiceMaker):
    name = "manhole"
    description = (
        "A Python console inside the running tend, on a UNIX socket only root and tend's "
        "own user may use."
    )
    options = (
        Option(
            "socket",
            None,
            None,
            "The UNIX socket to listen on (never TCP), made mode 0600 in a folder of the "
            "worker's user closed to others (made mode 0700 if missing). Whoever can use it "
            "runs any code as tend's user.",
            type=console_socket,
            required=True,
            path=True,
            metavar="PATH",
        ),
        Option(
            "idle-timeout",
            None,
            f"{DEFAULT_IDLE_TIMEOUT:g}",
            "Close a session that has sent no line for this many seconds.",
            type=positive_seconds,
            metavar="SECONDS",
        ),
        Option(
            "max-sessions",
            None,
            str(DEFAULT_MAX_SESSIONS),
            "Refuse sessions past this many at once (per worker).",
            type=session_count,
            metavar="N",
        ),
    )

    def make_service(self, options: Mapping[str, object]) -> Service:
        idle_timeout = options.get("idle_timeout")
        max_sessions = options.get("max_sessions")
        return ManholeService(
            console_socket(str(options["socket"])),
            idle_timeout=DEFAULT_IDLE_TIMEOUT if idle_timeout is None else float(str(idle_timeout)),
            max_sessions=DEFAULT_MAX_SESSIONS if max_sessions is None else int(str(max_sessions)),
        )


service_maker = ManholeMaker()
