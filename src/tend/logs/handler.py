"""What a `LogSink` and the access log ask of a handler, with default answers.

Owns `LogHandler`, the base of tend's handlers, and `LogError`, which they raise when a
destination cannot be opened. The defaults are those of a destination without a file that
needs a LogRecord for every line. Stays out of formatting, buffering and any particular
destination: each handler overrides what it can do.
"""

from __future__ import annotations

import logging

from tend.errors import StartupError

__all__ = ["LogError", "LogHandler", "fields_record"]


class LogError(StartupError):
    """A log destination could not be opened or reached, or its settings are wrong."""


class LogHandler(logging.Handler):
    """A `logging.Handler` that answers what a `LogSink` asks of any destination.

    The defaults are a destination without a file: nothing to reopen, no descriptor to keep,
    no lines to relay or take.
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

    def write_fields(self, name: str, levelno: int, msg: str, args: tuple[object, ...]) -> bool:
        """Take an access line from logger *name* as bare fields, without a LogRecord.

        Returns False, having done nothing, if this handler needs a record for the line: by
        default, and when it has filters or a formatter that is not tend's. The caller then
        makes one and calls `handle`. The caller has checked the handler's level.
        """
        return False


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
