"""How tend's log lines read: twistd's text, journald's, and JSON.

Owns the formatters: twistd's ``2026-11-25 20:57:14+0000 [context] message``, the
``<6>[context] message`` that journald reads a priority from, the bare ``[context] message``
that syslog stamps itself, and one JSON object per line. Each formats a record (`format`)
or, for the access log, a line's bare fields (`format_fields`), and both read alike. Stays
out of where lines go and when they are written (the handlers), and out of `logging`'s own
state: everything cached here (timestamps, line heads, contexts) is cached on the formatter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

__all__ = [
    "JournaldFormatter",
    "JsonFormatter",
    "LineFormatter",
    "TextFormatter",
    "TimestampedFormatter",
    "context_of",
    "journald_priority",
    "message_of",
]

# The attributes every LogRecord has; any other attribute came from `extra=` (JSON puts those at
# the top level). "message" and "asctime" are added by `logging.Formatter.format`.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def context_of(name: str) -> str:
    """The bracketed context twistd calls "system": '-' for tend itself, else the logger name.

    tend's own modules all log through the logger named "tend"; any other logger, an
    application's included, shows its name.
    """
    return "-" if name in ("root", "tend") else name


class LineFormatter(logging.Formatter):
    """A tend formatter: formats a record, or a line's bare fields (the access log's).

    `format_fields` gives what `format` gives for a record with the same fields, no exception
    and no extras, so an access line reads like any other line.
    """

    def format_fields(
        self, name: str, levelno: int, created: float, msg: str, args: tuple[object, ...]
    ) -> str:
        """Format a line from logger *name* without a LogRecord; *created* as time.time()."""
        raise NotImplementedError


def message_of(msg: str, args: tuple[object, ...]) -> str:
    """*msg* % *args*, as `logging.LogRecord.getMessage` makes a message.

    One non-empty mapping is the argument itself (``"%(peer)s", {"peer": peer}``), as
    LogRecord takes it.
    """
    if not args:
        return msg
    if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
        return msg % args[0]
    return msg % args


class TextFormatter(LineFormatter):
    """``[context] message``, every line of the message and traceback prefixed alike.

    Used bare for syslog, which stamps the time itself; subclasses add a stamp. Prefixing
    each traceback line (twistd indents them with a tab instead) lets grep by time or context
    find a whole record, and keeps a rotated file from starting mid-record unreadably.
    """

    def __init__(self) -> None:
        super().__init__()
        # Logger names are few; computing each one's context once keeps formatting cheap.
        self._contexts: dict[str, str] = {}

    def context(self, name: str) -> str:
        """The bracketed context of logger *name*'s lines."""
        context = self._contexts.get(name)
        if context is None:
            context = self._contexts[name] = context_of(name)
        return context

    def stamp(self, levelno: int, created: float) -> str:
        """What comes before ``[context]``: nothing here; a time or a priority in subclasses."""
        return ""

    def line_head(self, name: str, levelno: int, created: float) -> str:
        """Everything before the message on each line of a record: ``STAMP[context] ``."""
        return f"{self.stamp(levelno, created)}[{self.context(name)}] "

    def format(self, record: logging.LogRecord) -> str:
        # Not `record.__dict__`: reading it makes every later attribute read of the record slower.
        context = getattr(record, "context", None)
        if context is None:
            head = self.line_head(record.name, record.levelno, record.created)
        else:
            head = f"{self.stamp(record.levelno, record.created)}[{context}] "
        text = record.getMessage()
        if record.exc_info or record.exc_text or record.stack_info:
            if record.exc_info and not record.exc_text:
                # Cached on the record, as logging.Formatter does, for the other handlers.
                record.exc_text = self.formatException(record.exc_info)
            if record.exc_text:
                text = f"{text}\n{record.exc_text}"
            if record.stack_info:
                text = f"{text}\n{self.formatStack(record.stack_info)}"
        if "\n" not in text:
            return head + text
        return "\n".join(head + line for line in text.splitlines())

    def format_fields(
        self, name: str, levelno: int, created: float, msg: str, args: tuple[object, ...]
    ) -> str:
        head = self.line_head(name, levelno, created)
        text = message_of(msg, args)
        if "\n" not in text:
            return head + text
        return "\n".join(head + line for line in text.splitlines())


class TimestampedFormatter(TextFormatter):
    """twistd's line: ``2026-11-25 20:57:14+0000 [context] message``, in local time.

    The common line (one logger, one second) costs one dict look-up for its head: at a line
    per connection, this is a busy server's hot path.
    """

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

    def stamp(self, levelno: int, created: float) -> str:
        second = int(created)
        cached_second, stamp = self._stamp
        if second != cached_second:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S%z ", time.localtime(second))
            self._stamp = (second, stamp)
        return stamp

    def line_head(self, name: str, levelno: int, created: float) -> str:
        second = int(created)
        cached_second, heads = self._heads
        if second != cached_second:
            heads = {}
            self._heads = (second, heads)
        head = heads.get(name)
        if head is None:
            head = heads[name] = f"{self.stamp(levelno, created)}[{self.context(name)}] "
        return head

    # format and format_fields look the head up themselves, and call line_head only when
    # the second or the logger is new: a method call is a tenth of the hot path's cost.

    def format(self, record: logging.LogRecord) -> str:
        if (
            record.exc_info
            or record.exc_text
            or record.stack_info
            or getattr(record, "context", None) is not None
        ):
            return super().format(record)
        cached_second, heads = self._heads
        head = heads.get(record.name) if int(record.created) == cached_second else None
        if head is None:
            head = self.line_head(record.name, record.levelno, record.created)
        text = record.getMessage()
        if "\n" in text:
            return "\n".join(head + line for line in text.splitlines())
        return head + text

    def format_fields(
        self, name: str, levelno: int, created: float, msg: str, args: tuple[object, ...]
    ) -> str:
        cached_second, heads = self._heads
        head = heads.get(name) if int(created) == cached_second else None
        if head is None:
            head = self.line_head(name, levelno, created)
        text = message_of(msg, args)
        if "\n" in text:
            return "\n".join(head + line for line in text.splitlines())
        return head + text


def journald_priority(level: int) -> int:
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


class JournaldFormatter(TextFormatter):
    """``<6>[context] message``: journald stamps the time and reads the priority."""

    def stamp(self, levelno: int, created: float) -> str:
        return f"<{journald_priority(levelno)}>"


class JsonFormatter(LineFormatter):
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

    def format_fields(
        self, name: str, levelno: int, created: float, msg: str, args: tuple[object, ...]
    ) -> str:
        # Four strings: nothing the encoder can refuse.
        return self._encoder.encode(
            {
                "time": self.rfc3339(created),
                "level": logging.getLevelName(levelno).lower(),
                "logger": name,
                "message": message_of(msg, args),
            }
        )
