"""How tend's log lines read: twistd's text, journald's, and JSON.

Owns the formatters: twistd's ``2026-11-25 20:57:14+0000 [context] message``, the
``<6>[context] message`` that journald reads a priority from, the bare ``[context] message``
that syslog stamps itself, and one JSON object per line. Stays out of where lines go and
when they are written (the handlers), and out of `logging`'s own state: everything cached
here (timestamps, line heads, contexts) is cached on the formatter.
"""

from __future__ import annotations

import logging
import time

__all__ = [
    "JournaldFormatter",
    "JsonFormatter",
    "TextFormatter",
    "TimestampedFormatter",
    "context_of",
    "journald_priority",
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


class TextFormatter(logging.Formatter):
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
                context = self._contexts[record.name] = context_of(record.name)
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


class TimestampedFormatter(TextFormatter):
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
                context = self._contexts[name] = context_of(name)
            head = heads[name] = f"{self.head(record)}[{context}] "
        text = record.getMessage()
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

    def head(self, record: logging.LogRecord) -> str:
        return f"<{journald_priority(record.levelno)}>"


class JsonFormatter(logging.Formatter):
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
