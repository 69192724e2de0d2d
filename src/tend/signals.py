"""Signals: the only module that installs signal handlers. A handler records and wakes.

No handler raises or does any work: it appends the signal's number to a list, and
Python writes a byte to a wake-up pipe (``signal.set_wakeup_fd``). Whoever waits (the
launcher's wait, the supervisor's select loop, the start-up phases between their steps,
the serve loop's event loop) takes the recorded signals and acts on them at a point of
its choosing, so a signal can never cut a pidfile write or a ``finally`` in half.

Code that cannot stop between steps (an app file's import, which may block or loop) runs
inside `abandoning_on_stop`: a stop signal then abandons the start from a watching
thread, which is safe only because nothing of tend's exists yet to clean up.

Each process has its own `Signals`: a fork happens with the signals blocked
(`Signals.forking`), and the child renews its handlers and pipe before unblocking, so a
signal sent to the child in between is delivered to the child's own handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType

# Signals that ask tend to stop: the first one stops gracefully, a second at once (SIGQUIT
# too, as nginx and gunicorn take it, rather than dumping core with the pidfile left).
STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

# What the first process catches: the stops, SIGUSR1 (reopen the log), SIGHUP (reload) and
# SIGUSR2 (upgrade).
CAUGHT = (*STOP, signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2)

# A worker shares its supervisor's process group, so a terminal's Ctrl-C, Ctrl-\ and
# hang-up reach it too: it leaves them to the supervisor, which passes on a SIGTERM.
WORKER_CATCHES = (signal.SIGTERM,)
WORKER_IGNORES = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def name_of(signal_number: int) -> str:
    """``SIGTERM`` for 15."""
    return signal.Signals(signal_number).name


class Signals:
    """The signals one process catches, recorded by handlers that only record.

    *catch* are recorded; *ignore* are ignored (SIGUSR1 in a process that has no log to
    reopen, so that a rotator signalling early cannot kill it).
    """

    def __init__(self, catch: Iterable[int], ignore: Iterable[int] = ()) -> None:
        self.catch = tuple(catch)
        self.ignore = tuple(ignore)
        self._received: list[int] = []
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._installed = False

    def __repr__(self) -> str:
        return f"<Signals {[name_of(number) for number in self.catch]}>"

    def install(self) -> Signals:
        """Start recording: from now on each caught signal is kept until `take`."""
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signal_number in self.catch:
            signal.signal(signal_number, self._record)
        for signal_number in self.ignore:
            signal.signal(signal_number, signal.SIG_IGN)
        self._installed = True
        return self

    def _record(self, signal_number: int, frame: FrameType | None) -> None:
        # Only record: the waiting code acts once it wakes.
        self._received.append(signal_number)

    @property
    def wakeup_fd(self) -> int:
        """A descriptor that becomes readable when a signal arrives."""
        return self._read

    def take(self) -> list[int]:
        """The signals received since the last call, oldest first."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._read, 4096):
                pass
        # Swap the list rather than copy and clear it: a handler that runs in between
        # appends to one list or the other, and neither loses the signal.
        taken = self._received
        self._received = []
        return taken

    def peek(self) -> list[int]:
        """The signals received and not yet taken, without taking them."""
        return list(self._received)

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """Hold the caught signals back in this block; they are delivered at its end."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, self.catch)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    @contextlib.contextmanager
    def forking(self) -> Iterator[None]:
        """Block the caught signals around a fork; call `renew` in the child inside it.

        A signal sent meanwhile stays pending and is delivered, once unblocked, to the
        handlers of the process it was sent to.
        """
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, self.catch)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def default_for_exec(self) -> None:
        """In a child forked inside `forking` that is about to exec: the caught signals
        back to their default actions, then unblocked (a new program inherits the mask).
        """
        for signal_number in self.catch:
            signal.signal(signal_number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.catch)

    def renew(self, catch: Iterable[int] | None = None, ignore: Iterable[int] = ()) -> Signals:
        """In a forked child: a fresh Signals of its own, installed, replacing this copy."""
        self.close()
        return Signals(self.catch if catch is None else catch, ignore).install()

    def hand_to_loop(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[int], object]
    ) -> None:
        """Let *loop* receive the caught signals as *callback(number)* calls, in the loop.

        Signals recorded before are passed to *callback* now, in order.
        """
        for signal_number in self.catch:
            loop.add_signal_handler(signal_number, callback, signal_number)
        for signal_number in self.take():
            callback(signal_number)

    def take_back_from_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remove *loop*'s handlers and record the signals here again.

        Blocked meanwhile: asyncio puts the default handlers back as it removes its own,
        and a SIGTERM then would end the process, a SIGINT raise KeyboardInterrupt.
        """
        with self.blocked():
            for signal_number in self.catch:
                loop.remove_signal_handler(signal_number)
            self.install()

    def close(self) -> None:
        """Stop waking through this object's pipe and close it; handlers stay as they are."""
        if self._installed:
            with contextlib.suppress(ValueError):  # not the main thread
                signal.set_wakeup_fd(-1)
            self._installed = False
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._read = self._write = -1


@contextlib.contextmanager
def abandoning_on_stop(
    signals: Signals,
    abandon: Callable[[str], object],
    timeout: float = 0.0,
    too_long: str = "",
) -> Iterator[None]:
    """Run the block; if a stop signal comes before it ends, call *abandon(reason)*.

    With a *timeout* (seconds; 0 for none), a block still running by then is abandoned
    too, with *too_long* as the reason.

    For a start-up step that runs code which may never return to tend (an app file that
    blocks at import): the step cannot check a flag, and no handler may raise into it.
    A thread watches the wake-up pipe instead and, on a stop signal, calls *abandon*,
    which must end the process. Only use it while the process holds nothing that needs
    cleaning up. Once the block ends, the watcher is gone and the signal stays recorded
    for the next check.
    """
    done_read, done_write = os.pipe2(os.O_CLOEXEC)
    decided = threading.Lock()
    deadline = time.monotonic() + timeout if timeout else None

    def give_up(reason: str) -> None:
        try:
            abandon(reason)
        finally:
            # abandon ends the process; should it return or raise, the main thread would
            # wait on the lock for ever: end it here.
            os.kill(os.getpid(), signal.SIGKILL)

    def watch() -> None:
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([signals.wakeup_fd, done_read], [], [], left)
            if done_read in ready:
                return
            if not ready:  # the timeout
                if decided.acquire(blocking=False):
                    give_up(too_long)
                return
            try:
                data = os.read(signals.wakeup_fd, 64)
            except BlockingIOError:
                continue
            stops = [number for number in data if number in STOP]
            if stops and decided.acquire(blocking=False):
                give_up(f"stopped by {name_of(stops[0])} before the services were ready")

    watcher = threading.Thread(target=watch, name="tend-stop-watcher", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        # Whoever takes the lock first decides: the watcher abandons, or the block wins.
        decided.acquire()
        os.write(done_write, b"x")
        watcher.join()
        os.close(done_read)
        os.close(done_write)
