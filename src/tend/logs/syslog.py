"""The syslog client: RFC 3164 messages over a unix socket or UDP, tagged like twistd's.

Owns `SyslogHandler`: the framing ``<PRI>tag[PID]: line``, one message per line of a
record, and the socket (datagram or stream, reconnected once when syslog restarts).
Stays out of what a line looks like (`tend.logs.formats`) and of reading the settings,
which `tend.logs.open_log` checks.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import mmap
import os
import socket
import time

from tend.logs.formats import LineFormatter
from tend.logs.handler import LogHandler, fields_record

__all__ = ["SyslogHandler"]

# Forks this process has made, as a parent: see SyslogHandler on the first lines.
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_parent=_count_fork)


class SyslogHandler(LogHandler):
    """Sends RFC 3164 messages as `logging.handlers.SysLogHandler` does, tagged like twistd.

    Each line of a record is its own message, ``<PRI>tend[PID]: [context] line``, as twistd's
    SyslogObserver sends them. The pid is read per message: the daemon forks after opening.
    Unlike SysLogHandler, a missing unix socket is an error at once, not silently later, and a
    UDP host is resolved once rather than per message.

    The first lines (``Log opened.``, ``starting up``) are logged before ``tend`` detaches,
    in the process that then stays behind as the launcher. They are held, and sent with the
    daemon's first line, so they carry the daemon's pid, as every later line of the
    daemon does. Which process sends them: the first of a new session to log or flush (a
    detached daemon); else the process that opened the handler, at its first line after
    it forked (a run in the foreground, once its worker is started), at an error (a start
    that fails before any fork), or at the end. A worker of a foreground run, in its
    supervisor's session, never does; and a shared byte makes sure only one process ever
    sends them.
    """

    def __init__(self, address: str | tuple[str, int], facility: int, tag: str) -> None:
        self.address = address
        self.facility = facility
        self.tag = tag
        self._sockaddr: tuple[object, ...] | None = None  # resolved UDP address
        self._socket = self._connect()
        self._held: list[tuple[int, str]] | None = []  # (priority, line) not yet sent
        self._opener = os.getpid()
        self._session = os.getsid(0)
        self._forks = _forks
        self._sent = mmap.mmap(-1, 1)  # anonymous and shared: forked children see one byte
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
            self._send_lines(self.format(record), record.levelname)
        except Exception:
            self.handleError(record)

    def write_fields(self, name: str, levelno: int, msg: str, args: tuple[object, ...]) -> bool:
        """Send an access line formatted from its fields, as `emit` sends a record's."""
        formatter = self.formatter
        if self.filters or not isinstance(formatter, LineFormatter):
            return False
        with self.lock:  # type: ignore[union-attr]  # Handler.createLock always made one
            try:
                text = formatter.format_fields(name, levelno, time.time(), msg, args)
                self._send_lines(text, logging.getLevelName(levelno))
            except Exception:
                self.handleError(fields_record(name, levelno, msg, args))
        return True

    def _send_lines(self, text: str, levelname: str) -> None:
        """Send each line of *text* as a message at the priority of *levelname*."""
        level = logging.handlers.SysLogHandler.priority_map.get(levelname, "warning")
        priority = (self.facility << 3) | logging.handlers.SysLogHandler.priority_names[level]
        lines = [(priority, line) for line in text.split("\n")]
        if self._held is None:
            self._send_all(lines)
        elif os.getsid(0) != self._session:
            self._release(lines)  # the detached daemon, or one of its workers
        elif os.getpid() != self._opener:
            self._held = None  # a worker of a foreground run: its supervisor sends them
            self._send_all(lines)
        elif _forks != self._forks or priority & 7 <= logging.handlers.SysLogHandler.LOG_ERR:
            self._release(lines)
        else:
            self._held.extend(lines)  # the opener, which may yet detach

    def _release(self, lines: list[tuple[int, str]]) -> None:
        """Send the held lines, unless another process has, then *lines*."""
        held, self._held = self._held or [], None
        if self._sent[0] == 0:
            self._sent[0] = 1
            self._send_all(held)
        self._send_all(lines)

    def _send_all(self, lines: list[tuple[int, str]]) -> None:
        pid = os.getpid()
        for priority, line in lines:
            head = f"<{priority}>{self.tag}[{pid}]: " if self.tag else f"<{priority}>"
            # The trailing NUL is SysLogHandler's default (append_nul).
            self._send(f"{head}{line}\000".encode("utf-8", "backslashreplace"))

    def flush(self) -> None:
        """Send the held lines from a detached daemon; the launcher's flush keeps them."""
        if self._held is not None and os.getsid(0) != self._session:
            with self.lock:  # type: ignore[union-attr]  # Handler.createLock always made one
                self._release([])

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
            if self._held is not None:
                # A run that logged nothing after its first lines still sends them; the
                # launcher's copy is dropped, as its daemon has sent them.
                self._release([])
            self._socket.close()
        finally:
            self.release()
        super().close()
