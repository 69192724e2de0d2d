"""tend's log: what goes where, and the sink a run installs.

Owns the public surface (`LogConfig`, `LogError`, `LogSink`, `open_log`,
`parse_syslog_address`) and the routing: which handler and formatter a `LogConfig` asks
for, and the checks on its settings. Only installs handlers; never prints, and changes
nothing in `logging` but what `LogSink.install` is for: its handler on the root logger and
the root level (`LogConfig.level`). Everything else in tend logs through the standard
`logging` API, or through `tend.AccessLog` for a line per connection.

One module per job: `formats` (how a line reads), `buffered` (writing in bursts, standard
output), `rotating` (the log file and its relay from workers), `syslog` (the syslog
client), `access` (the access log), `handler` (what the sink asks of every handler). Only
the names listed here and `tend.AccessLog` are public.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import IO

from tend.errors import quote
from tend.logs import access
from tend.logs.buffered import StreamHandler
from tend.logs.formats import (
    JournaldFormatter,
    JsonFormatter,
    TextFormatter,
    TimestampedFormatter,
)
from tend.logs.handler import LogError, LogHandler
from tend.logs.rotating import LogFileHandler

__all__ = [
    "LogConfig",
    "LogError",
    "LogSink",
    "open_log",
    "parse_syslog_address",
]


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
            f"cannot use syslog address {quote(text)}: write an IPv6 host in brackets, as [::1]:514"
        )
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise LogError(
            f"cannot use syslog address {quote(text)}: the port must be a number from 1 to 65535"
        )
    if not host:
        raise LogError(f"cannot use syslog address {quote(text)}: the host is missing")
    return host, int(port_text)


def open_log(config: LogConfig, stdout: IO[str] | None = None) -> LogSink:
    """Open the destination *config* names, ready to `LogSink.install`.

    Files and syslog sockets are opened here, before the process detaches or drops
    privileges, so that a mistake is reported on the terminal and a root-only path works.

    Raises:
        LogError: a setting is invalid or the destination cannot be opened.
    """
    if config.format not in ("text", "json"):
        raise LogError(f"cannot use log format {quote(config.format)}: choose 'text' or 'json'")
    if config.max_bytes < 0:
        raise LogError(f"cannot rotate logs at {config.max_bytes} bytes: use 0 or more")
    if config.backups is not None and config.backups < 0:
        raise LogError(f"cannot keep {config.backups} rotated logs: use 0 or more")
    json_format = config.format == "json"
    shares_stderr = False

    handler: LogHandler
    if config.syslog:
        handler = _open_syslog(config)
        handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
        description = f"syslog at {config.syslog_address}"
    elif config.logfile is None or config.logfile == "-":
        handler = StreamHandler(sys.stdout if stdout is None else stdout)
        if json_format:
            handler.setFormatter(JsonFormatter())
        elif _connected_to_journal():
            handler.setFormatter(JournaldFormatter())
            # The same journal stream on both: what is logged is what stderr would say.
            shares_stderr = stdout is None and _same_file(1, 2)
        else:
            handler.setFormatter(TimestampedFormatter())
        description = "standard output"
    else:
        handler = LogFileHandler(config.logfile, config.max_bytes, config.backups)
        handler.setFormatter(JsonFormatter() if json_format else TimestampedFormatter())
        description = config.logfile
    sink = LogSink(handler, description, config.level)
    sink.shares_stderr = shares_stderr
    return sink


class LogSink:
    """An opened log destination, which a run installs, reopens on SIGUSR1 and closes."""

    handler: LogHandler
    description: str  # for messages: "/var/log/tend.log", "standard output", "syslog at ..."
    # Whether a line logged here is also what standard error shows (one journal stream).
    shares_stderr: bool = False
    level: int

    def __init__(self, handler: LogHandler, description: str, level: int = logging.INFO) -> None:
        self.handler = handler
        self.description = description
        self.level = level
        self._closed = False

    def __repr__(self) -> str:
        return f"<LogSink {self.description}>"

    def install(self) -> None:
        """Send every log record and access line here: attach to the root logger, set its level."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        root = logging.getLogger()
        root.addHandler(self.handler)
        root.setLevel(self.level)
        access.add_destination(self.handler)
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

    def leave_the_file(self) -> None:
        """After an upgrade: the successor rotates and reopens the log file; this process,
        draining, only appends to the file it has open (two rotating writers would rename
        each other's files)."""
        self.handler.leave_the_file()

    def settle(self) -> None:
        """This process is the one that runs the services (it has detached, or will not):
        write what was held until it was known which process that would be."""
        self.handler.settle()

    def close(self) -> None:
        """Detach from the root logger, write out every buffered line and close; idempotent."""
        if self._closed:
            return
        self._closed = True
        access.remove_destination(self.handler)
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


def _open_syslog(config: LogConfig) -> LogHandler:
    # Here: only syslog needs these, and start-up time counts.
    import logging.handlers

    from tend.logs.syslog import SyslogHandler

    facility = logging.handlers.SysLogHandler.facility_names.get(config.syslog_facility)
    if facility is None:
        names = ", ".join(sorted(logging.handlers.SysLogHandler.facility_names))
        raise LogError(
            f"cannot use syslog facility {quote(config.syslog_facility)}: choose one of {names}"
        )
    address = parse_syslog_address(config.syslog_address)
    try:
        return SyslogHandler(address, facility, config.prefix)
    except OSError as error:
        reason = error.strerror or str(error)
        raise LogError(f"cannot reach syslog at {config.syslog_address}: {reason}") from error


def _same_file(fd: int, other: int) -> bool:
    try:
        first, second = os.fstat(fd), os.fstat(other)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


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
