"""Log handlers: standard output, rotated files, syslog, JSON, journald.

Only installs handlers; never prints. `open_log` turns a `LogConfig` into a `LogSink`, whose
handler the runner attaches to the root logger; everything else in tend logs through the
standard `logging` API.

The file and standard-output handlers are built for a server that logs one line per
connection at tens of thousands of connections a second: they format into memory and write
a burst's lines with a single write (see `_BufferedHandler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from tend.errors import StartupError

__all__ = [
    "LogConfig",
    "LogError",
    "LogSink",
    "open_log",
    "parse_syslog_address",
]

# Buffered lines are written at once past this many characters, even mid-iteration, so a burst
# of records between two loop iterations cannot grow memory without bound.
_FLUSH_THRESHOLD = 64 * 1024

# Under load, buffered lines are written at most this often (or per _FLUSH_THRESHOLD). A
# write per loop iteration costs a system call per connection or two when a server is
# busy, more than formatting the line; a quiet server still writes each line at once.
_FLUSH_INTERVAL = 0.05

# The attributes every LogRecord has; any other attribute came from `extra=` (JSON puts those at
# the top level). "message" and "asctime" are added by `logging.Formatter.format`.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class LogError(StartupError):
    """A log destination could not be opened or reached, or its settings are wrong."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Where and how to log (twistd: --logfile, --syslog, --prefix)."""

    logfile: str | None = None  # None or "-": standard output; else a file path
    syslog: bool = False  # send to syslog instead of a file
    prefix: str = "tend"  # syslog tag (ident)
    syslog_facility: str = "user"  # a name in SysLogHandler.facility_names
    syslog_address: str = "/dev/log"  # unix socket path, or HOST:PORT for UDP
    max_bytes: int = 1_000_000  # rotate before a file would exceed this; 0 disables rotation
    backups: int | None = None  # rotated files to keep; None keeps them all, as twistd does
    format: str = "text"  # "text" (twistd's) or "json"
    level: int = logging.INFO


def parse_syslog_address(text: str) -> str | tuple[str, int]:
    """Parse a syslog address: a unix socket path, or ``HOST:PORT`` (``[IPV6]:PORT``) for UDP.

    Anything containing a slash, or no colon at all, is a path.

    Raises:
        LogError: the port is not a number from 1 to 65535, or an IPv6 host lacks brackets.
    """
    if not text:
        raise LogError("cannot use syslog address '': it is empty")
    if "/" in text or ":" not in text:
        return text
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise LogError(
            f"cannot use syslog address {text!r}: write an IPv6 host in brackets, as [::1]:514"
        )
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise LogError(
            f"cannot use syslog address {text!r}: the port must be a number from 1 to 65535"
        )
    if not host:
        raise LogError(f"cannot use syslog address {text!r}: the host is missing")
    return host, int(port_text)


def open_log(config: LogConfig, stdout: IO[str] | None = None) -> LogSink:
    """Open the destination *config* names, ready to `LogSink.install`.

    Files and syslog sockets are opened here, before the process detaches or drops
    privileges, so that a mistake is reported on the terminal and a root-only path works.

    Raises:
        LogError: a setting is invalid or the destination cannot be opened.
    """
    if config.format not in ("text", "json"):
        raise LogError(f"cannot use log format {config.format!r}: choose 'text' or 'json'")
    if config.max_bytes < 0:
        raise LogError(f"cannot rotate logs at {config.max_bytes} bytes: use 0 or more")
    if config.backups is not None and config.backups < 0:
        raise LogError(f"cannot keep {config.backups} rotated logs: use 0 or more")
    json_format = config.format == "json"

    handler: _LogHandler
    if config.syslog:
        handler = _open_syslog(config)
        handler.setFormatter(_JsonFormatter() if json_format else _TextFormatter())
        description = f"syslog at {config.syslog_address}"
    elif config.logfile is None or config.logfile == "-":
        handler = _StreamHandler(sys.stdout if stdout is None else stdout)
        if json_format:
            handler.setFormatter(_JsonFormatter())
        elif _connected_to_journal():
            handler.setFormatter(_JournaldFormatter())
        else:
            handler.setFormatter(_TimestampedFormatter())
        description = "standard output"
    else:
        handler = _FileHandler(config.logfile, config.max_bytes, config.backups)
        handler.setFormatter(_JsonFormatter() if json_format else _TimestampedFormatter())
        description = config.logfile
    return LogSink(handler, description, config.level)


class LogSink:
    """An opened log destination, which the runner installs, reopens on SIGUSR1 and closes."""

    handler: _LogHandler
    description: str  # for messages: "/var/log/tend.log", "standard output", "syslog at ..."
    level: int

    def __init__(self, handler: _LogHandler, description: str, level: int = logging.INFO) -> None:
        self.handler = handler
        self.description = description
        self.level = level
        self._closed = False

    def __repr__(self) -> str:
        return f"<LogSink {self.description}>"

    def install(self) -> None:
        """Send every log record here: attach to the root logger and set its level."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        root = logging.getLogger()
        root.addHandler(self.handler)
        root.setLevel(self.level)
        logging.getLogger("tend").info("Log opened.")

    def reopen(self) -> None:
        """Reopen a log file by its path, after logrotate moved it (SIGUSR1).

        Lines logged before the call go to the moved file. Does nothing for standard output
        and syslog.

        Raises:
            LogError: the path cannot be opened; logging continues into the moved file.
        """
        self.handler.reopen()

    def flush(self) -> None:
        """Write out every buffered line now."""
        self.handler.flush()

    def close(self) -> None:
        """Detach from the root logger, write out every buffered line and close; idempotent."""
        if self._closed:
            return
        self._closed = True
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()

    def fileno(self) -> int | None:
        """The descriptor of the open log file, which detaching must keep open; else None."""
        return self.handler.fileno()

    def relay_to(self, fd: int) -> None:
        """In a forked worker: send formatted lines to *fd*, a pipe, instead of the file.

        The supervisor reads the pipe and passes the lines to its own sink's `write_lines`,
        so one process alone writes and rotates the file.

        Raises:
            RuntimeError: the destination is not a file (standard output and syslog are
                shared by the workers as they are).
        """
        self.handler.relay_to(fd)

    def write_lines(self, lines: list[str]) -> None:
        """Write lines another process formatted (without their newlines), now, in order."""
        self.handler.write_lines(lines)


# Formatters


def _context_of(name: str) -> str:
    """The bracketed context twistd calls "system": '-' for tend itself, else the logger name.

    tend's own modules all log through the logger named "tend"; any other logger, an
    application's included, shows its name.
    """
    return "-" if name in ("root", "tend") else name


class _TextFormatter(logging.Formatter):
    """``[context] message``, every line of the message and traceback prefixed alike.

    Used bare for syslog, which stamps the time itself; subclasses add a line head. Prefixing
    each traceback line (twistd indents them with a tab instead) lets grep by time or context
    find a whole record, and keeps a rotated file from starting mid-record unreadably.
    """

    def __init__(self) -> None:
        super().__init__()
        # Logger names are few; computing each one's context once keeps emit cheap.
        self._contexts: dict[str, str] = {}

    def head(self, record: logging.LogRecord) -> str:
        """What comes before ``[context]`` on every line of *record*."""
        return ""

    def format(self, record: logging.LogRecord) -> str:
        context = getattr(record, "context", None)
        if context is None:
            context = self._contexts.get(record.name)
            if context is None:
                context = self._contexts[record.name] = _context_of(record.name)
        prefix = f"{self.head(record)}[{context}] "
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            # Cached on the record, as logging.Formatter does, for the other handlers.
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        if "\n" not in text:
            return prefix + text
        return "\n".join(prefix + line for line in text.splitlines())


class _TimestampedFormatter(_TextFormatter):
    """twistd's line: ``2026-11-25 20:57:14+0000 [context] message``, in local time."""

    def __init__(self) -> None:
        super().__init__()
        # (second, its text): strftime costs more than the rest of a record, and a busy
        # server logs thousands of records a second. One tuple, so a reader never sees a
        # second paired with another second's text.
        self._stamp = (-1, "")

        # (second, {logger name: "stamp [context] "}): the whole line head, built once a
        # second per logger. A dict only ever holds heads of its own second, so a thread
        # holding the previous pair still builds right heads.
        self._heads: tuple[int, dict[str, str]] = (-1, {})

    def head(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached_second, stamp = self._stamp
        if second != cached_second:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S%z ", time.localtime(second))
            self._stamp = (second, stamp)
        return stamp

    def format(self, record: logging.LogRecord) -> str:
        # The common record (one line, no traceback, no context of its own) is one dict
        # look-up and a concatenation: at a line per connection, this is a server's hot path.
        # Not `record.__dict__`: reading it makes every later attribute read of the record slower.
        if (
            record.exc_info
            or record.exc_text
            or record.stack_info
            or getattr(record, "context", None) is not None
        ):
            return super().format(record)
        second = int(record.created)
        cached_second, heads = self._heads
        if second != cached_second:
            heads = {}
            self._heads = (second, heads)
        name = record.name
        head = heads.get(name)
        if head is None:
            context = self._contexts.get(name)
            if context is None:
                context = self._contexts[name] = _context_of(name)
            head = heads[name] = f"{self.head(record)}[{context}] "
        text = record.getMessage()
        if "\n" in text:
            return "\n".join(head + line for line in text.splitlines())
        return head + text


def _journald_priority(level: int) -> int:
    """The syslog priority journald reads from ``<N>`` (sd-daemon(3)) for a logging level."""
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    if level >= logging.INFO:
        return 6
    return 7


class _JournaldFormatter(_TextFormatter):
    """``<6>[context] message``: journald stamps the time and reads the priority."""

    def head(self, record: logging.LogRecord) -> str:
        return f"<{_journald_priority(record.levelno)}>"


def _connected_to_journal() -> bool:
    """Whether systemd connected standard error (or output) to the journal (systemd.exec(5)).

    systemd sets JOURNAL_STREAM to the device and inode of that stream; a child whose streams
    were redirected elsewhere inherits the variable, so it must match an open descriptor.
    """
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    for fd in (2, 1):
        try:
            status = os.fstat(fd)
        except OSError:
            continue
        if expected == f"{status.st_dev}:{status.st_ino}":
            return True
    return False


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, exception."""

    def __init__(self) -> None:
        super().__init__()
        # (second, "2026-11-25T20:57:14", "+00:00"), recomputed when the second changes.
        self._time = (-1, "", "")
        import json  # here: only JSON logs need it, and start-up time counts

        # One encoder: json.dumps with options builds a new one for every call.
        self._encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=str)

    def rfc3339(self, created: float) -> str:
        """*created* in local time with its offset, to the millisecond."""
        second = int(created)
        cached_second, base, offset = self._time
        if second != cached_second:
            local = time.localtime(second)
            base = time.strftime("%Y-%m-%dT%H:%M:%S", local)
            minutes = abs(local.tm_gmtoff) // 60
            sign = "-" if local.tm_gmtoff < 0 else "+"
            offset = f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
            self._time = (second, base, offset)
        return f"{base}.{int((created - second) * 1000):03d}{offset}"

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": self.rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # A set difference in C finds the (usually no) extras faster than a loop in Python.
        if extras := record.__dict__.keys() - _RECORD_ATTRIBUTES:
            for key, value in record.__dict__.items():
                if key in extras:
                    # An extra field may not replace the four above.
                    document.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        try:
            return self._encoder.encode(document)
        except (TypeError, ValueError):
            # Non-string dict keys, a cycle, NaN: the record still gets logged, extras as text.
            core = ("time", "level", "logger", "message", "exception", "stack")
            plain = {key: value if key in core else str(value) for key, value in document.items()}
            return self._encoder.encode(plain)


# Handlers


class _LogHandler(logging.Handler):
    """A `logging.Handler` that answers what a `LogSink` asks of any destination.

    The defaults are a destination without a file: nothing to reopen, no descriptor to keep,
    no lines to relay or take. Each handler overrides what it can do.
    """

    def reopen(self) -> None:
        """Reopen the destination by its path (SIGUSR1); nothing to do by default."""

    def fileno(self) -> int | None:
        """The descriptor that detaching must keep open, if any."""
        return None

    def relay_to(self, fd: int) -> None:
        """In a forked worker: send formatted lines to *fd*, a pipe, for the supervisor."""
        raise RuntimeError(f"{self!r} cannot relay: only a log file's lines are relayed")

    def write_lines(self, lines: list[str]) -> None:
        """Write lines formatted in another process (without their newlines), in order."""
        raise RuntimeError(f"{self!r} cannot write formatted lines")


# Every buffered handler, for _forget_scheduled_writes.
_buffered_handlers: weakref.WeakSet[_BufferedHandler] = weakref.WeakSet()


def _forget_scheduled_writes() -> None:
    """In a forked child: the parent's loop is not running here, whatever it says."""
    for handler in list(_buffered_handlers):
        handler._scheduled_on = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_scheduled_writes)


class _BufferedHandler(_LogHandler):
    """Formats records into memory and writes them in bursts.

    The first record after a quiet spell schedules a write with `loop.call_soon`, so it
    reaches its destination in the loop's next iteration, before the loop waits for I/O.
    While records keep coming, writes happen at most every `_FLUSH_INTERVAL` seconds, so a
    busy server makes a few writes a second instead of one per connection.
    Without a running loop in the emitting thread (start-up, shutdown, another thread) the
    write is immediate, as it is for ERROR and above (the process may be about to die), past
    `_FLUSH_THRESHOLD`, and on `flush()` and `close()`.

    `handle` holds `self.lock` around `emit`, as `logging.Handler.handle` does; the scheduled
    write takes it too, so threads never interleave inside the buffer or a write. It stays an
    RLock: a message argument's ``__str__`` may itself log, re-entering `emit`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._buffer: list[str] = []
        self._buffered_chars = 0
        # The loop a write is scheduled on, if any. A loop closed with the write still pending
        # is not this thread's running loop, so the next record schedules again: nothing waits
        # on a dead loop.
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        self._scheduled_thread = 0  # threading.get_ident() of the thread that scheduled it
        _buffered_handlers.add(self)
        self._last_record: logging.LogRecord | None = None  # for handleError after a write
        self._last_write = 0.0  # time.monotonic() of the last write
        self._closed = False

    def handle(self, record: logging.LogRecord) -> bool:
        """Emit *record* unless a filter drops it, holding the lock (as `logging.Handler.handle`).

        The same steps with fewer calls: a handler without filters does not call `filter`.
        """
        if self.filters:
            result = self.filter(record)
            if not result:
                return result
            if isinstance(result, logging.LogRecord):  # Python 3.12: a filter may replace it
                record = result
        # Handler.createLock always made one, and forking re-creates it.
        with self.lock:  # type: ignore[union-attr]
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if self._closed:
            return
        try:
            formatter = self.formatter
            text = self.format(record) if formatter is None else formatter.format(record)
        except Exception:
            self.handleError(record)
            return
        line = text + "\n"
        self._buffer.append(line)
        self._buffered_chars += len(line)
        self._last_record = record
        if record.levelno >= logging.ERROR or self._buffered_chars >= _FLUSH_THRESHOLD:
            self._write_buffer()
            return
        # A write already scheduled on a loop running in this thread takes this line too. This
        # is checked before asyncio.get_running_loop(), which makes a getpid() system call per
        # record; a forked child forgets its parent's scheduled write (_forget_scheduled_writes).
        scheduled = self._scheduled_on
        if (
            scheduled is not None
            and self._scheduled_thread == threading.get_ident()
            and scheduled.is_running()
        ):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_buffer()
            return
        if scheduled is not loop:
            wait = self._last_write + _FLUSH_INTERVAL - time.monotonic()
            if wait > 0:
                loop.call_later(wait, self._scheduled_write)
            else:
                loop.call_soon(self._scheduled_write)
            self._scheduled_on = loop
            self._scheduled_thread = threading.get_ident()

    def _scheduled_write(self) -> None:
        self.acquire()
        try:
            self._scheduled_on = None
            self._write_buffer()
        finally:
            self.release()

    def _write_buffer(self) -> None:
        """Write out the buffer; the caller holds the lock."""
        if not self._buffer:
            return
        self._last_write = time.monotonic()
        lines, self._buffer, self._buffered_chars = self._buffer, [], 0
        try:
            self._write_lines(lines)
        except Exception:
            self.handleError(self._last_record or logging.makeLogRecord({}))

    def _write_lines(self, lines: list[str]) -> None:
        """Write formatted lines, each ending in a newline, to the destination."""
        raise NotImplementedError

    def write_lines(self, lines: list[str]) -> None:
        """Write lines formatted elsewhere (relayed from a worker), after any buffered ones."""
        self.acquire()
        try:
            if not self._closed:
                self._buffer.extend(line + "\n" for line in lines)
                self._write_buffer()
        finally:
            self.release()

    def _close_destination(self) -> None:
        """Release the destination; the caller holds the lock and has written the buffer."""

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_buffer()
        finally:
            self.release()

    def close(self) -> None:
        """Write out the buffer and close; later records are dropped."""
        self.acquire()
        try:
            if not self._closed:
                self._write_buffer()
                self._closed = True
                self._close_destination()
        finally:
            self.release()
        super().close()


class _StreamHandler(_BufferedHandler):
    """Writes to a text stream (standard output), which it leaves open."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self.stream = stream
        self._reader_gone = False

    def _write_lines(self, lines: list[str]) -> None:
        if self._reader_gone:
            return
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except BrokenPipeError:
            # `tend --nodaemon ... | head`: the reader left. The server goes on; its log
            # has nowhere to go, and a traceback per line would help no one.
            self._reader_gone = True
            # Point the descriptor at /dev/null, so the stream's own flush at exit is quiet.
            with contextlib.suppress(OSError, ValueError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, self.stream.fileno())
                os.close(null)


class _FileHandler(_BufferedHandler):
    """Appends to a file, rotating it as twistd's LogFile does.

    Before a write that would take the file past *max_bytes*, the file becomes ``PATH.1``
    (``PATH.1`` becomes ``PATH.2``, and so on) and a fresh one starts. A line is never split
    across files, nor a record unless it alone exceeds *max_bytes*; a line that alone exceeds
    it fills a fresh file by itself.

    The file's folder is held open and every open, rename and listing goes through it,
    so rotation and SIGUSR1 reopening keep working after a chroot, where the path given
    at start no longer leads there.
    """

    def __init__(self, path: str, max_bytes: int, backups: int | None) -> None:
        self.path = path
        # Not self._name: logging.Handler keeps its own name there.
        folder, self._file_name = os.path.split(os.path.abspath(path))
        try:
            self._folder = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise LogError(f"cannot open log file {path!r}: {error.strerror}") from error
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd: int | None = None
        self._size = 0
        self._rotates = False
        self._relaying = False  # writing to a pipe to the supervisor, see relay_to
        try:
            opened = self._open_or_raise()
        except LogError:
            os.close(self._folder)
            raise
        # Only now: Handler.__init__ registers the handler for logging.shutdown().
        super().__init__()
        self._adopt(*opened)

    def fileno(self) -> int | None:
        return self._fd

    def _open(self) -> tuple[int, os.stat_result]:
        # The mode is left to the umask in force, as the user chose it (--umask).
        fd = os.open(
            self._file_name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666, dir_fd=self._folder
        )
        try:
            return fd, os.fstat(fd)
        except OSError:
            os.close(fd)
            raise

    def _open_or_raise(self) -> tuple[int, os.stat_result]:
        try:
            return self._open()
        except OSError as error:
            raise LogError(f"cannot open log file {self.path!r}: {error.strerror}") from error

    def _adopt(self, fd: int, status: os.stat_result) -> None:
        """Make *fd* the file written to, closing the previous one."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._size = status.st_size
        # Renaming /dev/stdout or a FIFO would be wrong: only regular files rotate.
        self._rotates = self.max_bytes > 0 and stat.S_ISREG(status.st_mode)

    def reopen(self) -> None:
        """Write out the buffer, then reopen the path (logrotate moved the file; SIGUSR1).

        Raises:
            LogError: the path cannot be opened; the old file stays in use.
        """
        self.acquire()
        try:
            if self._closed or self._relaying:
                return
            self._write_buffer()
            self._adopt(*self._open_or_raise())
        finally:
            self.release()

    def relay_to(self, fd: int) -> None:
        """In a forked worker: write to *fd*, a pipe, and leave the file to the supervisor.

        Lines buffered before the fork are the supervisor's to write, so they are dropped
        here rather than written twice.
        """
        self.acquire()
        try:
            self._buffer, self._buffered_chars = [], 0
            self._scheduled_on = None
            self._rotates = False
            self._relaying = True
            if self._fd is not None:
                os.close(self._fd)
            self._fd = fd
        finally:
            self.release()

    def _close_destination(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._folder >= 0:
            os.close(self._folder)
            self._folder = -1

    def _write_lines(self, lines: list[str]) -> None:
        data = "".join(lines).encode("utf-8", "backslashreplace")
        if not self._rotates or self._size + len(data) <= self.max_bytes:
            self._write(data)
            return
        # About to cross the limit: trust the file over our count, which is stale if
        # logrotate's copytruncate emptied the file.
        assert self._fd is not None  # _rotates is only set with a file open
        self._size = os.fstat(self._fd).st_size
        if self._size + len(data) <= self.max_bytes:
            self._write(data)
            return
        self._write_rotating(lines)

    def _write_rotating(self, lines: list[str]) -> None:
        """Write *lines* in as many files as the limit needs, rotating at record boundaries."""
        chunk: list[bytes] = []
        chunk_size = 0
        rotates = True
        for unit in self._units(lines):
            filled = self._size + chunk_size
            if rotates and filled > 0 and filled + len(unit) > self.max_bytes:
                if chunk:
                    self._write(b"".join(chunk))
                    chunk, chunk_size = [], 0
                try:
                    self._rotate()
                except OSError:
                    # Report it, and keep writing to the current file: a line is worth more
                    # than the limit. The next write that crosses the limit tries again.
                    rotates = False
                    self.handleError(self._last_record or logging.makeLogRecord({}))
            chunk.append(unit)
            chunk_size += len(unit)
        if chunk:
            self._write(b"".join(chunk))

    def _units(self, lines: list[str]) -> Iterator[bytes]:
        """The pieces rotation may not split: records, or the lines of an oversized record."""
        for line in lines:
            data = line.encode("utf-8", "backslashreplace")
            if len(data) > self.max_bytes and data.count(b"\n") > 1:
                for part in data[:-1].split(b"\n"):
                    yield part + b"\n"
            else:
                yield data

    def _write(self, data: bytes) -> None:
        assert self._fd is not None  # only called between open and close
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            if written == 0:  # not expected of a file; do not spin forever
                raise OSError(errno.EIO, f"cannot write to log file {self.path!r}")
            self._size += written
            view = view[written:]

    def _rotate(self) -> None:
        """Start a fresh file, keeping the old one as PATH.1 (twistd: LogFile.rotate).

        Older backups move up one number, and those past *backups* are deleted.
        """
        folder, name = self._folder, self._file_name
        for number in sorted(self._backup_numbers(), reverse=True):
            older = f"{name}.{number}"
            if self.backups is not None and number >= self.backups:
                os.unlink(older, dir_fd=folder)
            else:
                os.rename(older, f"{name}.{number + 1}", src_dir_fd=folder, dst_dir_fd=folder)
        if self.backups == 0:
            os.unlink(name, dir_fd=folder)
        else:
            os.rename(name, f"{name}.1", src_dir_fd=folder, dst_dir_fd=folder)
        # Should this open fail, the old descriptor, now PATH.1, keeps receiving lines.
        self._adopt(*self._open())

    def _backup_numbers(self) -> list[int]:
        prefix = self._file_name + "."
        numbers = []
        # scandir reads a duplicate of the descriptor and rewinds it when done.
        with os.scandir(self._folder) as entries:
            for entry in entries:
                suffix = entry.name[len(prefix) :]
                # Not "tend.log.1.gz" (compressed by logrotate) nor "tend.log.01".
                if (
                    entry.name.startswith(prefix)
                    and suffix.isascii()
                    and suffix.isdigit()
                    and str(int(suffix)) == suffix
                ):
                    numbers.append(int(suffix))
        return numbers


def _open_syslog(config: LogConfig) -> _SyslogHandler:
    import logging.handlers  # here: only syslog needs it, and start-up time counts

    facility = logging.handlers.SysLogHandler.facility_names.get(config.syslog_facility)
    if facility is None:
        names = ", ".join(sorted(logging.handlers.SysLogHandler.facility_names))
        raise LogError(
            f"cannot use syslog facility {config.syslog_facility!r}: choose one of {names}"
        )
    address = parse_syslog_address(config.syslog_address)
    try:
        return _SyslogHandler(address, facility, config.prefix)
    except OSError as error:
        reason = error.strerror or str(error)
        raise LogError(f"cannot reach syslog at {config.syslog_address}: {reason}") from error


class _SyslogHandler(_LogHandler):
    """Sends RFC 3164 messages as `logging.handlers.SysLogHandler` does, tagged like twistd.

    Each line of a record is its own message, ``<PRI>tend[PID]: [context] line``, as twistd's
    SyslogObserver sends them. The pid is read per message: the daemon forks after opening.
    Unlike SysLogHandler, a missing unix socket is an error at once, not silently later, and a
    UDP host is resolved once rather than per message.
    """

    def __init__(self, address: str | tuple[str, int], facility: int, tag: str) -> None:
        self.address = address
        self.facility = facility
        self.tag = tag
        self._sockaddr: tuple[object, ...] | None = None  # resolved UDP address
        self._socket = self._connect()
        # Only now: Handler.__init__ registers the handler for logging.shutdown().
        super().__init__()

    def _connect(self) -> socket.socket:
        if isinstance(self.address, str):
            # Datagram, else stream, as SysLogHandler tries (some syslog-ng /dev/log are streams).
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.connect(self.address)
            except OSError as error:
                sock.close()
                if error.errno != errno.EPROTOTYPE:
                    raise
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(self.address)
                except OSError:
                    sock.close()
                    raise
            return sock
        host, port = self.address
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        # Not connected: a connected UDP socket would report the ICMP errors of a syslog
        # server that is down as failures of later, unrelated records.
        self._sockaddr = sockaddr
        return socket.socket(family, kind, proto)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            level = logging.handlers.SysLogHandler.priority_map.get(record.levelname, "warning")
            priority = (self.facility << 3) | logging.handlers.SysLogHandler.priority_names[level]
            head = f"<{priority}>{self.tag}[{os.getpid()}]: " if self.tag else f"<{priority}>"
            for line in text.split("\n"):
                # The trailing NUL is SysLogHandler's default (append_nul).
                self._send(f"{head}{line}\000".encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)

    def _send(self, message: bytes) -> None:
        if self._sockaddr is not None:
            self._socket.sendto(message, self._sockaddr)
            return
        try:
            self._socket.sendall(message)
        except OSError:
            # The syslog daemon restarted and made a new socket: reconnect once, as
            # SysLogHandler does.
            self._socket.close()
            self._socket = self._connect()
            self._socket.sendall(message)

    def close(self) -> None:
        self.acquire()
        try:
            self._socket.close()
        finally:
            self.release()
        super().close()
