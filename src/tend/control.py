"""The control socket: tendctl asks the supervisor, and hears how it went.

A UNIX socket next to the pidfile (``tend.pid`` → ``tend.ctl``), made mode 0600 with no
moment when it is wider, answering only a peer whose uid (``SO_PEERCRED``) is root or
the supervisor's own. A request is one line of JSON, ``{"command": "reload"}``; the
answer is one line of JSON, ``{"ok": true, "message": "..."}`` plus what the command
reports, sent once the command is done: a reload answers when the new generation
serves, or failed. Signals can ask the same things, but cannot say how it went.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable

from tend.endpoints import UNIXEndpoint

# A request is small: past this, the peer is not tendctl.
LONGEST_REQUEST = 4096

# A peer that has not sent its whole request in this long is dropped.
REQUEST_TIMEOUT = 5.0

COMMANDS = ("status", "reload", "upgrade", "stop", "reopen-logs")


def control_path(pidfile: str) -> str:
    """Where the control socket of the tend holding *pidfile* is: ``tend.pid`` → ``tend.ctl``."""
    stem = pidfile[: -len(".pid")] if pidfile.endswith(".pid") else pidfile
    return stem + ".ctl"


Answer = Callable[[dict[str, object]], None]
Handler = Callable[[str, Answer], None]


class ControlServer:
    """The supervisor's end: accepts, checks the peer, reads one request, hands it on."""

    def __init__(self, path: str, *, take_over: bool = False) -> None:
        self.path = path
        if take_over:
            # The tend being upgraded still listens at *path*: bind beside it, then rename
            # over it, so that tendctl always finds a live tend there.
            beside = f"{path}.{os.getpid()}"
            self.listening = UNIXEndpoint(beside, mode=0o600, backlog=16).listen()
            os.rename(beside, path)
            self.listening = self.listening.renamed(path)
        else:
            self.listening = UNIXEndpoint(path, mode=0o600, backlog=16).listen()
        self.socket = self.listening.sockets[0]
        self.allowed = {0, os.geteuid()}
        self.connections: dict[int, Connection] = {}

    def fileno(self) -> int:
        return self.socket.fileno()

    def accept(self) -> Connection | None:
        """Take the next peer, or None if none is waiting.

        A peer that may not ask anything is answered so once its request has arrived (not
        at once: closing before it has sent would leave it a broken pipe, not the reason).
        """
        try:
            peer, _ = self.socket.accept()
        except OSError:  # none waiting (BlockingIOError), or gone meanwhile
            return None
        peer.setblocking(False)
        uid = peer_uid(peer)
        refusal = None if uid in self.allowed else f"uid {uid} may not control tend"
        connection = Connection(peer, refusal)
        self.connections[connection.fileno()] = connection
        return connection

    def close(self) -> None:
        for connection in list(self.connections.values()):
            connection.close()
        self.connections.clear()
        self.listening.close()

    def forget(self) -> None:
        """In a worker: close this copy, leaving the socket file to the supervisor."""
        for connection in list(self.connections.values()):
            with contextlib.suppress(OSError):
                connection.peer.close()
        self.connections.clear()
        self.listening.forget()


class Connection:
    """One tendctl asking one thing."""

    def __init__(self, peer: socket.socket, refusal: str | None = None) -> None:
        self.peer = peer
        # Its number, kept: once closed the socket says -1, and the selector and the table
        # of connections still have it under this one.
        self.fd = peer.fileno()
        self.refusal = refusal  # the answer to whatever it asks: it may not ask
        self.buffer = b""
        self.deadline = time.monotonic() + REQUEST_TIMEOUT
        self.answered = False
        self.waiting = False  # asked, and waiting for the answer (a reload takes a while)

    def fileno(self) -> int:
        return self.fd

    def read(self) -> str | None:
        """The command, once the request line is whole; None until then.

        Raises:
            ValueError: the request is not one tend understands (the peer is answered).
        """
        try:
            data = self.peer.recv(LONGEST_REQUEST)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            raise ValueError("the peer left")
        self.buffer += data
        if b"\n" not in self.buffer:
            if len(self.buffer) > LONGEST_REQUEST:
                self.answer({"ok": False, "message": "the request is too long"})
                raise ValueError("too long")
            return None
        if self.refusal is not None:
            self.answer({"ok": False, "message": self.refusal})
            raise ValueError("refused")
        import json  # here: a run that is never asked anything need not import it

        line = self.buffer.split(b"\n", 1)[0]
        try:
            request = json.loads(line)
            command = request["command"]
        except (ValueError, KeyError, TypeError, RecursionError):  # [[[... 3,000 deep
            command = None
        if not isinstance(command, str):
            self.answer({"ok": False, "message": "not a tendctl request"})
            raise ValueError("not understood")
        if command not in COMMANDS:
            self.answer({"ok": False, "message": f"unknown command {command!r}"})
            raise ValueError("unknown command")
        return str(command)

    def answer(self, reply: dict[str, object]) -> None:
        """Send the one-line answer and close; a peer already gone is no matter."""
        if self.answered:
            return
        self.answered = True
        with contextlib.suppress(OSError):
            self.peer.setblocking(True)
            self.peer.settimeout(REQUEST_TIMEOUT)
            self.peer.sendall(_encode(reply))
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.peer.close()


def peer_uid(peer: socket.socket) -> int:
    """The uid of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    return peer_credentials(peer)[1]


def peer_credentials(peer: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a UNIX socket (SO_PEERCRED): for
    a listening socket's peer, the process that listened."""
    credentials = peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", credentials)
    return int(pid), int(uid)


def _encode(reply: dict[str, object]) -> bytes:
    import json

    return (json.dumps(reply, ensure_ascii=False, default=str) + "\n").encode()


class NotTend(ValueError):
    """What listens on the control socket is not the tend the pidfile names."""

    def __init__(self, message: str, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


def ask(
    path: str, command: str, timeout: float, is_tend: Callable[[int], bool] | None = None
) -> dict[str, object]:
    """tendctl's end: ask the tend at *path* and wait up to *timeout* for its answer.

    Before asking, the listener's credentials (``SO_PEERCRED``) are checked: its uid must
    be root or this user's, and *is_tend(pid)* must hold, so that a socket planted by
    someone else, in a folder others can write to, is never taken for tend.

    Raises:
        FileNotFoundError, ConnectionRefusedError: no tend listens there.
        NotTend: something else does.
        OSError: the socket cannot be used; TimeoutError: no answer in time.
        ValueError: the answer is not one tend gives.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(path)
        pid, uid = peer_credentials(client)
        if uid not in (0, os.geteuid()):
            raise NotTend(f"it is held by uid {uid}, neither root nor yours", pid)
        if is_tend is not None and not is_tend(pid):
            raise NotTend(f"it is held by pid {pid}, not by the tend of the pidfile", pid)
        client.sendall(_encode({"command": command}))
        data = b""
        deadline = time.monotonic() + timeout
        while not data.endswith(b"\n"):
            client.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
    import json

    answer = json.loads(data)
    if not isinstance(answer, dict):
        raise ValueError("not an answer")
    return answer
