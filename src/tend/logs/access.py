"""The access log: one cheap line per connection, in the same log as every other line.

Modelled on nginx's buffered ``access_log``. An `AccessLog` honours levels exactly as
``logging.getLogger(name).isEnabledFor(level)`` does. Under an installed `tend.logs.LogSink`,
a line that passes is formatted from its fields and joins the sink handler's buffer, in order
with every other line, with no `logging.Logger` call and no LogRecord. With no sink installed
(a library, a test) it is an ordinary `logging` call, so nothing is lost. Handlers of the
application's own subscribe to receive a LogRecord for each line.

Owns where an access line goes: the installed sinks' handlers, the subscribers, else
`logging`. Stays out of formatting and writing (the sink handler's formatter and buffer do
that) and out of `logging`'s configuration, which it only reads.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tend.logs.handler import LogHandler

__all__ = ["AccessLog", "add_destination", "remove_destination"]

# The installed sinks' handlers (LogSink.install adds, LogSink.close removes) and the handlers
# subscribed with AccessLog.subscribe. Tuples replaced whole, under _changing, so that a
# thread writing a line reads one consistent tuple without taking a lock.
_destinations: tuple[LogHandler, ...] = ()
_subscribers: tuple[logging.Handler, ...] = ()
_changing = threading.Lock()


def add_destination(handler: LogHandler) -> None:
    """Send access lines to *handler*, an installed sink's (`LogSink.install`)."""
    global _destinations
    with _changing:
        if handler not in _destinations:
            _destinations = (*_destinations, handler)


def remove_destination(handler: LogHandler) -> None:
    """Stop sending access lines to *handler* (`LogSink.close`); no error if it was not sent any."""
    global _destinations
    with _changing:
        _destinations = tuple(known for known in _destinations if known is not handler)


def _reaches_root(logger: logging.Logger) -> bool:
    """Whether *logger*'s records reach the root logger's handlers (tend's sink is there).

    A logger or a parent with ``propagate = False`` keeps its lines to its own handlers:
    then the line goes through `logging`, which honours that.
    """
    current: logging.Logger | None = logger
    while current is not None:
        if not current.propagate:
            return False
        current = current.parent
    return True


class AccessLog:
    """A cheap line per connection: ``access = tend.AccessLog(__name__)`` at module level.

    ``access.info("sending %d bytes of poetry to %s", size, peer)`` logs what
    ``logging.getLogger(__name__).info(...)`` would, when that logger is enabled for the
    level, and where it would: into tend's log, formatted alike. The arguments are formatted
    only if the line is written. Under tend the line skips `logging`'s machinery, so the
    logger's handlers and those of its parents do not see it; a handler that should,
    `subscribe` it. A filter on the logger itself sends its lines through `logging` as usual.
    """

    __slots__ = ("_logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger = logging.getLogger(name)

    def __repr__(self) -> str:
        return f"<AccessLog {self.name}>"

    def debug(self, msg: str, *args: object) -> None:
        """Log *msg* % *args* at DEBUG."""
        if self._logger.isEnabledFor(logging.DEBUG):
            self._write(logging.DEBUG, msg, args)

    def info(self, msg: str, *args: object) -> None:
        """Log *msg* % *args* at INFO."""
        if self._logger.isEnabledFor(logging.INFO):
            self._write(logging.INFO, msg, args)

    def warning(self, msg: str, *args: object) -> None:
        """Log *msg* % *args* at WARNING."""
        if self._logger.isEnabledFor(logging.WARNING):
            self._write(logging.WARNING, msg, args)

    @staticmethod
    def subscribe(handler: logging.Handler) -> None:
        """Hand *handler* a LogRecord for every access line, of every AccessLog, from now on.

        A subscribed handler receives each line once, at or above its own level, whether or
        not it is also attached to a logger.
        """
        global _subscribers
        with _changing:
            if handler not in _subscribers:
                _subscribers = (*_subscribers, handler)

    @staticmethod
    def unsubscribe(handler: logging.Handler) -> None:
        """Stop handing *handler* access lines; no error if it was not subscribed."""
        global _subscribers
        with _changing:
            _subscribers = tuple(known for known in _subscribers if known is not handler)

    def _write(self, levelno: int, msg: str, args: tuple[object, ...]) -> None:
        """Route a line that passed the level check.

        Called only by debug, info and warning: `_record` and the stacklevel below count the
        frames between here and the caller.
        """
        logger = self._logger
        destinations = _destinations
        if destinations and not logger.filters and _reaches_root(logger):
            record = None
            for handler in destinations:
                if levelno >= handler.level and not handler.write_fields(
                    self.name, levelno, msg, args
                ):
                    # The handler has a filter or a formatter of the user's: it needs a record.
                    if record is None:
                        record = self._record(levelno, msg, args)
                    handler.handle(record)
            subscribers = _subscribers
            if subscribers:
                if record is None:
                    record = self._record(levelno, msg, args)
                for subscriber in subscribers:
                    if levelno >= subscriber.level:
                        subscriber.handle(record)
        elif _subscribers:
            # logging's way, with the subscribers it does not reach.
            record = self._record(levelno, msg, args)
            logger.handle(record)
            reached = _handlers_reached(logger)
            for subscriber in _subscribers:
                if levelno >= subscriber.level and subscriber not in reached:
                    subscriber.handle(record)
        else:
            # Three frames up from here, past logging's own: _write, the level method, and
            # the caller, whose file, line and function the record names.
            logger.log(levelno, msg, *args, stacklevel=3)

    def _record(self, levelno: int, msg: str, args: tuple[object, ...]) -> logging.LogRecord:
        """A record of the line, naming the caller of debug, info or warning as logging would."""
        # Four frames up, past logging's own: _record, _write, the level method, the caller.
        filename, lineno, function, _ = self._logger.findCaller(False, 4)
        return self._logger.makeRecord(
            self.name, levelno, filename, lineno, msg, args, None, function
        )


def _handlers_reached(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers `logging` offers a record of *logger* (as `Logger.callHandlers` walks)."""
    reached: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        reached.extend(current.handlers)
        if not current.propagate:
            break
        current = current.parent
    return reached
