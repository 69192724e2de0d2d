"""Messages between tend's processes: the one format for READY, STOPPING, WATCHDOG, ERROR.

A message is what systemd's sd_notify sends: newline-separated ``KEY=VALUE`` lines, in
one datagram. tend's processes send each other:

=================  ==================================================================
``READY=1``        every service is started; with ``STATUS=`` what is served and, from
                   a detached daemon to its launcher, ``MAINPID=`` the daemon's pid
``STOPPING=1``     the stop has begun
``WATCHDOG=1``     the event loop is alive (a worker to its supervisor)
``ERROR=text``     the start failed; the text is the one line for the user
``MAINPID=n``      from a detached daemon, as soon as it exists: who to pass signals to
``STOP=1``         from a supervisor to a worker it may not signal: stop, as on SIGTERM
``STOP=now``       from a supervisor to its workers: stop at once (a second stop signal)
=================  ==================================================================

so the supervisor can forward what systemd understands as it is. Values are one line
(newlines become spaces). A `Channel` is one end of a ``SOCK_SEQPACKET`` socket pair:
every send arrives as one message, and a closed or dead peer reads as end-of-file, which
is how a launcher knows its daemon is gone. Makes no OS calls but on its own sockets.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass

# Far more than any message: a status line names listeners, an error one line.
_MAX_MESSAGE = 65536


@dataclass(frozen=True, slots=True)
class Message:
    """One message: its ``KEY=VALUE`` fields."""

    fields: dict[str, str]

    @classmethod
    def decode(cls, data: bytes) -> Message:
        fields: dict[str, str] = {}
        for line in data.decode("utf-8", "replace").split("\n"):
            key, equals, value = line.partition("=")
            if equals:
                fields[key] = value
        return cls(fields)

    def encode(self) -> bytes:
        text = "\n".join(f"{key}={value}" for key, value in self.fields.items())
        # A path's undecodable bytes arrive as surrogates: sent escaped, never raising.
        return text.encode("utf-8", "backslashreplace")

    def get(self, key: str) -> str | None:
        return self.fields.get(key)

    @property
    def ready(self) -> bool:
        return self.fields.get("READY") == "1"

    @property
    def stopping(self) -> bool:
        return self.fields.get("STOPPING") == "1"

    @property
    def watchdog(self) -> bool:
        return self.fields.get("WATCHDOG") == "1"

    @property
    def stop(self) -> bool:
        return self.fields.get("STOP") == "1"

    @property
    def stop_now(self) -> bool:
        return self.fields.get("STOP") == "now"

    @property
    def error(self) -> str | None:
        return self.fields.get("ERROR")

    @property
    def mainpid(self) -> int | None:
        text = self.fields.get("MAINPID", "")
        return int(text) if text.isascii() and text.isdigit() else None


def message(**fields: object) -> Message:
    """A message of these fields, each value made one line of text."""
    return Message({key: " ".join(str(value).splitlines()) for key, value in fields.items()})


class Channel:
    """One end of a message channel between two processes."""

    def __init__(self, sock: socket.socket) -> None:
        self._socket: socket.socket | None = sock

    def __repr__(self) -> str:
        return f"<Channel fd {self.fileno()}>"

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        """Two connected ends; give one to the process that forks off, keep the other."""
        first, second = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(first), cls(second)

    def fileno(self) -> int:
        return -1 if self._socket is None else self._socket.fileno()

    @property
    def closed(self) -> bool:
        return self._socket is None

    def send(self, **fields: object) -> bool:
        """Send one message; False if the peer is gone (its reader decides what that means)."""
        if not fields:
            raise ValueError("a message needs at least one field: an empty one reads as the end")
        if self._socket is None:
            return False
        try:
            self._socket.send(message(**fields).encode())
        except OSError:
            return False
        return True

    def receive(self) -> Message | None:
        """The next message, waiting for it if the socket blocks; None at end-of-file."""
        if self._socket is None:
            return None
        try:
            data = self._socket.recv(_MAX_MESSAGE)
        except BlockingIOError:
            raise
        except OSError:
            return None
        if not data:
            return None
        return Message.decode(data)

    def set_blocking(self, blocking: bool) -> None:
        if self._socket is not None:
            self._socket.setblocking(blocking)

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None
