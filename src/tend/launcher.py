"""The launcher: the process a user (or systemd) started, waiting on a detached daemon.

It forks the daemon away (`daemon.detach`), then waits for the daemon's word on a
`Channel`: ``READY=1`` (tell systemd the daemon's pid, exit 0) or ``ERROR=`` (exit 1
with the daemon's one line, once the daemon is gone). A stop signal meanwhile is passed
on to the daemon, which stops cleanly; the launcher waits until the daemon has exited,
then says that the start was stopped. So the shell's ``tend poetry && nc ...`` works
with no sleep, and whatever the launcher reports is what happened.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal

from tend import daemon
from tend.channel import Channel, Message
from tend.errors import StartupError
from tend.signals import STOP, Signals, name_of
from tend.systemd import Notifier


def detach(signals: Signals) -> tuple[Channel, Signals, bool]:
    """Fork the daemon: ``(channel, signals, True)`` in the launcher, ``(..., False)`` in it.

    Each side gets its end of the channel and its own signals; the daemon's standard
    streams are left for the caller to redirect once it has nothing more to say there.
    """
    launcher_end, daemon_end = Channel.pair()
    with signals.forking():
        pid = daemon.detach()
        if pid is None:
            signals = signals.renew()
    if pid is not None:
        daemon_end.close()
        return launcher_end, signals, True
    launcher_end.close()
    return daemon_end, signals, False


class Launcher:
    """Waits for the daemon at the other end of *channel*; see the module's docstring.

    *log_description* names the daemon's log, for when it dies without a word.
    """

    def __init__(
        self,
        channel: Channel,
        signals: Signals,
        notifier: Notifier | None,
        log_description: str,
    ) -> None:
        self.channel = channel
        self.signals = signals
        self.notifier = notifier
        self.log_description = log_description
        self.daemon_pid: int | None = None
        self.pidfd: int | None = None
        self.stopped_by: str | None = None
        self.unforwarded: list[int] = []
        self.error: str | None = None
        self.selector: selectors.BaseSelector | None = None

    def wait(self) -> int:
        """Return 0 once the daemon is ready.

        Raises:
            StartupError: the daemon failed, died, or was stopped before it was ready.
        """
        self.selector = selector = selectors.DefaultSelector()
        selector.register(self.signals.wakeup_fd, selectors.EVENT_READ, "signals")
        selector.register(self.channel.fileno(), selectors.EVENT_READ, "channel")
        try:
            while True:
                for key, _ in selector.select():
                    if key.data == "signals":
                        self._on_signals()
                    elif key.data == "daemon":
                        # Gone: whatever else holds its end of the channel open (a
                        # process it forked) cannot keep the launcher waiting.
                        return self._daemon_gone()
                    elif (message := self.channel.receive()) is not None:
                        # A stop signal taken with READY still counts: pass it on first.
                        self._on_signals()
                        if self._on_message(message):
                            return 0
                    else:
                        # The daemon closed its end: it exited, or it became ready as our
                        # stop signal reached it. Either way, wait until it is gone.
                        selector.unregister(key.fd)
                        self.channel.close()
                        if self.pidfd is None:
                            return self._daemon_gone()
        finally:
            selector.close()
            self.channel.close()
            if self.pidfd is not None:
                os.close(self.pidfd)

    def _on_signals(self) -> None:
        for signal_number in self.signals.take():
            if signal_number not in STOP:
                continue  # SIGHUP (a closed terminal) and SIGUSR1: the daemon goes on
            if self.stopped_by is None and self.error is None:
                self.stopped_by = name_of(signal_number)
            self.unforwarded.append(signal_number)
        self._forward()

    def _forward(self) -> None:
        if self.pidfd is None:
            return
        for signal_number in self.unforwarded:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal_number)
        self.unforwarded.clear()

    def _on_message(self, message: Message) -> bool:
        """Act on the daemon's *message*; True when it is ready and the launcher is done."""
        if message.mainpid is not None and self.daemon_pid is None:
            self.daemon_pid = message.mainpid
            with contextlib.suppress(ProcessLookupError):
                self.pidfd = os.pidfd_open(message.mainpid)
                if self.selector is not None:
                    self.selector.register(self.pidfd, selectors.EVENT_READ, "daemon")
            self._forward()
        if message.error is not None and self.error is None:
            self.error = message.error
        if message.ready and self.stopped_by is None:
            if self.notifier is not None:
                # systemd hears from its main process only (NotifyAccess=main): the
                # launcher names the daemon as the new main process as it reports ready.
                self.notifier.ready(message.get("STATUS") or "running", mainpid=self.daemon_pid)
            return True
        return False

    def _daemon_gone(self) -> int:
        # What came first is what the start died of: a failure the daemon reported, or
        # the stop signal this launcher passed on.
        if self.stopped_by is not None:
            raise StartupError(f"stopped by {self.stopped_by} before the services were ready")
        if self.error is not None:
            raise StartupError(self.error)
        raise StartupError(f"the daemon exited before it was ready; see {self.log_description}")
