"""Writing formatted lines in bursts, and the standard-output handler built on it.

Owns `BufferedHandler`: lines are formatted into memory and written a burst at a time,
scheduled on the running event loop, so that a server logging a line per connection makes a
few writes a second instead of one per connection. Stays out of what a line looks like (the
formatter's job) and of any destination's details: subclasses write the lines
(`StreamHandler` here, the rotating file in `tend.logs.rotating`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from typing import IO

from tend.logs.formats import LineFormatter
from tend.logs.handler import LogHandler, fields_record

__all__ = ["BufferedHandler", "StreamHandler"]

# Buffered lines are written at once past this many characters, even mid-iteration, so a burst
# of records between two loop iterations cannot grow memory without bound.
_FLUSH_THRESHOLD = 64 * 1024

# Under load, buffered lines are written at most this often (or per _FLUSH_THRESHOLD). A
# write per loop iteration costs a system call per connection or two when a server is
# busy, more than formatting the line; a quiet server still writes each line at once.
_FLUSH_INTERVAL = 0.05


# Every buffered handler, for _forget_scheduled_writes.
_buffered_handlers: weakref.WeakSet[BufferedHandler] = weakref.WeakSet()


def _forget_scheduled_writes() -> None:
    """In a forked child: the parent's loop is not running here, whatever it says."""
    for handler in list(_buffered_handlers):
        handler._scheduled_on = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_scheduled_writes)


class BufferedHandler(LogHandler):
    """Formats records into memory and writes them in bursts.

    The first record after a quiet spell schedules a write with `loop.call_soon`, so it
    reaches its destination in the loop's next iteration, before the loop waits for I/O.
    While records keep coming, writes happen at most every `_FLUSH_INTERVAL` seconds, so a
    busy server makes a few writes a second instead of one per connection.
    Without a running loop in the emitting thread (start-up, shutdown, another thread) the
    write is immediate, as it is for ERROR and above (the process may be about to die), past
    `_FLUSH_THRESHOLD`, and on `flush()` and `close()`.

    The access log's lines (`write_fields`) join the same buffer, formatted from their fields
    without a LogRecord, so they reach the destination in order with every other line.

    `handle` holds `self.lock` around `emit`, as `logging.Handler.handle` does;
    `write_fields` and the scheduled write take it too, so threads never interleave inside
    the buffer or a write. It stays an RLock: a message argument's ``__str__`` may itself
    log, re-entering `emit`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._buffer: list[str] = []  # formatted lines, each ending in a newline
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
                return False
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
        self._last_record = record
        self._add(text, record.levelno)

    def write_fields(self, name: str, levelno: int, msg: str, args: tuple[object, ...]) -> bool:
        """Format an access line from its fields and buffer it, as `emit` does a record's."""
        formatter = self.formatter
        if self.filters or not isinstance(formatter, LineFormatter):
            return False
        with self.lock:  # type: ignore[union-attr]  # as in handle
            if self._closed:
                return True
            try:
                text = formatter.format_fields(name, levelno, time.time(), msg, args)
            except Exception:
                self.handleError(fields_record(name, levelno, msg, args))
                return True
            self._last_record = None
            self._add(text, levelno)
        return True

    def _add(self, text: str, levelno: int) -> None:
        """Buffer a formatted line and write or schedule; the caller holds the lock."""
        line = text + "\n"
        self._buffer.append(line)
        self._buffered_chars += len(line)
        if levelno >= logging.ERROR or self._buffered_chars >= _FLUSH_THRESHOLD:
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


class StreamHandler(BufferedHandler):
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
