"""What a `LogSink` and the access log ask of a handler, with default answers.

Owns `LogHandler`, the base of tend's handlers, and `LogError`, which they raise when a
destination cannot be opened. The defaults are those of a destination without a file that
needs a LogRecord for every line. Stays out of formatting, buffering and any particular
destination: each handler overrides what it can do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from tend.errors import StartupError, one_line

# A handler that cannot write says so on standard error at most this often.
_COMPLAINT_INTERVAL = 10.0

__all__ = ["LogError", "LogHandler", "fields_record"]


class LogError(StartupError):
    """A log destination could not be opened or reached, or its settings are wrong."""


class LogHandler(logging.Handler):
    """A `logging.Handler` that answers what a `LogSink` asks of any destination.

    The defaults are a destination without a file: nothing to reopen, no descriptor to keep,
    no lines to relay or take.
    """

    _last_complaint = -_COMPLAINT_INTERVAL

    def handleError(self, record: logging.LogRecord) -> None:
        """A destination that fails: one line on standard error, at most every 10 s.

        logging's own handleError prints a traceback per record ("--- Logging error ---"):
        a full disk or a dead syslog would fill the terminal, or the journal, with them.
        A record that cannot be formatted (a bad ``%d`` in the caller's code) still gets
        logging's traceback, which shows the call to fix.
        """
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)
            return
        now = time.monotonic()
        if now - self._last_complaint < _COMPLAINT_INTERVAL:
            return
        self._last_complaint = now
        error = sys.exc_info()[1]
        reason = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
        complain(f"tend: cannot write to the log ({self.describe()}): {reason}")

    def describe(self) -> str:
        """The destination, for messages."""
        return type(self).__name__

    def reopen(self) -> None:
        """Reopen the destination by its path (SIGUSR1); nothing to do by default."""

    def fileno(self) -> int | None:
        """The descriptor that detaching must keep open, if any."""
        return None

    def settle(self) -> None:
        """The process that runs the services is this one: send anything held for it."""

    def leave_the_file(self) -> None:
        """Another process now owns the destination (an upgrade's successor): go on
        appending where this one writes, but neither rotate nor reopen it."""

    def relay_to(self, fd: int) -> None:
        """In a forked worker: send formatted lines to *fd*, a pipe, for the supervisor."""
        raise RuntimeError(f"{self!r} cannot relay: only a log file's lines are relayed")

    def write_lines(self, lines: list[str]) -> None:
        """Write lines formatted in another process (without their newlines), in order."""
        raise RuntimeError(f"{self!r} cannot write formatted lines")

    def write_fields(self, name: str, levelno: int, msg: str, args: tuple[object, ...]) -> bool:
        """Take an access line from logger *name* as bare fields, without a LogRecord.

        Returns False, having done nothing, if this handler needs a record for the line: by
        default, and when it has filters or a formatter that is not tend's. The caller then
        makes one and calls `handle`. The caller has checked the handler's level.
        """
        return False


def complain(line: str) -> None:
    """Write *line* to standard error (fd 2) as one line, whatever state logging is in."""
    # No standard error to complain on: the log was all there was.
    with contextlib.suppress(OSError):
        os.write(2, (one_line(line) + "\n").encode("utf-8", "backslashreplace"))


def fields_record(name: str, levelno: int, msg: str, args: tuple[object, ...]) -> logging.LogRecord:
    """A record of an access line's fields, for `logging.Handler.handleError` to describe."""
    return logging.makeLogRecord(
        {
            "name": name,
            "levelno": levelno,
            "levelname": logging.getLevelName(levelno),
            "msg": msg,
            "args": args,
        }
    )
