"""Upgrade: run the tend program anew on the same sockets, with no moment unserved.

The supervisor (SIGUSR2, ``tendctl upgrade``) starts its successor: the same command
line, run again from the program on disk now (a newer tend, say), given the listening
sockets as inherited descriptors named in ``TEND_SOCKETS`` (as systemd's ``LISTEN_FDS``
names its own) and a channel in ``TEND_UPGRADE_CHANNEL`` on which it reports, as a
detached daemon reports to its launcher: ``MAINPID=``, then ``READY=1`` or ``ERROR=``.
The successor takes the pidfile over (a new locked file renamed into place: the path
always names a locked file of a live tend) and the control socket likewise, starts its
workers, and says READY; only then does the old supervisor drain and exit, leaving the
socket files to it. This module holds the two ends of that hand-over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
from dataclasses import dataclass, field

from tend.channel import Channel
from tend.control import peer_credentials
from tend.errors import StartupError
from tend.signals import Signals

__all__ = ["CHANNEL", "SOCKETS", "Handover", "Successor", "start_successor"]

SOCKETS = "TEND_SOCKETS"
CHANNEL = "TEND_UPGRADE_CHANNEL"  # lifecycle.py looks for it without importing this


@dataclass(slots=True)
class Handover:
    """In the successor: the channel to the old supervisor, and the sockets it passed."""

    channel: Channel
    # endpoint key -> one entry per listener of the old tree, each its copies' descriptors
    sockets: dict[str, list[list[list[int]]]] = field(default_factory=dict)

    @classmethod
    def from_environment(cls) -> Handover | None:
        """The hand-over this process was started for, if any; its variables are removed,
        so that a program tend starts does not take them for its own.

        As systemd's ``LISTEN_PID`` guards ``LISTEN_FDS``, the channel proves the hand-over
        real: it must be a UNIX socket whose other end is this process's parent. Stray
        variables (copied from another shell, say) are ignored.

        Raises:
            StartupError: the channel is real but the sockets it names are not.
        """
        channel_text = os.environ.pop(CHANNEL, None)
        sockets_text = os.environ.pop(SOCKETS, None)
        if channel_text is None or not (channel_text.isascii() and channel_text.isdigit()):
            return None
        fd = int(channel_text[:9])
        if not _from_parent(fd):
            return None
        os.set_inheritable(fd, False)
        try:
            sockets = _passed_sockets(sockets_text or "[]")
        except (ValueError, TypeError, KeyError, RecursionError):
            raise StartupError(
                f"cannot take over from the upgrading tend: {SOCKETS} is not its list of sockets"
            ) from None
        return cls(Channel(socket.socket(fileno=fd)), sockets)

    def take(self, key: str) -> list[list[socket.socket]] | None:
        """The copies passed for the next listener on the endpoint named *key*, if any."""
        passed = self.sockets.get(key)
        if not passed:
            return None
        copies = passed.pop(0)
        return [[socket.socket(fileno=fd) for fd in copy] for copy in copies]

    def close_unused(self) -> None:
        """Close the sockets no listener of the new tree took (an endpoint now gone)."""
        for passed in self.sockets.values():
            for copies in passed:
                for copy in copies:
                    for fd in copy:
                        with contextlib.suppress(OSError):
                            os.close(fd)
        self.sockets.clear()


@dataclass(slots=True)
class Successor:
    """In the old supervisor: the new program, started, until it is ready or gone."""

    pid: int
    pidfd: int
    channel: Channel
    ready: bool = False
    error: str | None = None


def _from_parent(fd: int) -> bool:
    """Whether descriptor *fd* is a connected UNIX socket whose peer is our parent."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        probe = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    with probe:
        try:
            return probe.family == socket.AF_UNIX and peer_credentials(probe)[0] == os.getppid()
        except OSError:
            return False


def _passed_sockets(text: str) -> dict[str, list[list[list[int]]]]:
    """``TEND_SOCKETS`` read: endpoint key -> per listener, its copies' descriptors, each
    checked to be an open socket (and kept from the programs tend starts)."""
    sockets: dict[str, list[list[list[int]]]] = {}
    for item in json.loads(text):
        key, copies = str(item["key"]), [[int(fd) for fd in copy] for copy in item["copies"]]
        for copy in copies:
            for descriptor in copy:
                try:
                    is_socket = stat.S_ISSOCK(os.fstat(descriptor).st_mode)
                except OSError:
                    is_socket = False
                if not is_socket:
                    raise ValueError(f"descriptor {descriptor} is not a socket")
                os.set_inheritable(descriptor, False)
        sockets.setdefault(key, []).append(copies)
    return sockets


def start_successor(
    sockets: list[tuple[str, list[list[int]]]], cwd: str, signals: Signals
) -> Successor:
    """Run this process's command line again, as a child, handing it *sockets*.

    *sockets* is, per listener, its endpoint key and its copies' descriptors. The
    child starts from *cwd*, where tend was first started, so that relative paths on the
    command line mean what they meant.

    Raises:
        OSError: the new process could not be made.
    """
    ours, theirs = Channel.pair()
    passed = [theirs.fileno(), *(fd for _, copies in sockets for copy in copies for fd in copy)]
    environment = dict(os.environ)
    environment[CHANNEL] = str(theirs.fileno())
    environment[SOCKETS] = json.dumps([{"key": key, "copies": copies} for key, copies in sockets])
    # The interpreter as it was started: `python -m tend ...` or `.../bin/tend ...`.
    argv = [sys.executable, *sys.orig_argv[1:]]
    from tend import daemon

    try:
        with signals.forking():  # no handler of ours may run in the child: it has our pipe
            pid = daemon.fork()
            if pid == 0:  # the successor, until exec: nothing here may return
                try:
                    signals.default_for_exec()
                except BaseException:
                    daemon.exit_now(127)
    except OSError:
        ours.close()
        theirs.close()
        raise
    if pid == 0:
        status = 127
        try:
            for fd in passed:
                os.set_inheritable(fd, True)
            # systemd's watchdog is meant for the process that pings it: this one, next.
            if "WATCHDOG_USEC" in environment:
                environment["WATCHDOG_PID"] = str(os.getpid())
            os.chdir(cwd)
            os.execve(sys.executable, argv, environment)
        finally:
            daemon.exit_now(status)
    theirs.close()
    try:
        pidfd = daemon.watch_child(pid)  # a successor it cannot watch must not go on
    except OSError:
        ours.close()
        raise
    return Successor(pid, pidfd, ours)
