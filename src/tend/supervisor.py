"""The supervisor process: keeps the pidfile, the listening sockets and the log file; runs workers.

Every run has one, as gunicorn always has its arbiter: the process that binds the
sockets as the starting user stays behind, small, and runs the tree in forked workers
(one unless ``--workers`` says more). It holds the pidfile (so a clean stop removes it
even from a root-only rundir such as /run), writes the workers' log lines to the log
file (so rotation works after a drop of privileges, and N workers never race over one
file), restarts a worker that dies, passes stop signals on, and reports to whoever
started it (`Upstream`). What to do and when is decided in supervision.py; this is the
I/O around it: fork, pidfds, pipes and a plain ``selectors`` loop (not asyncio: a child
forked from inside a running event loop would share the parent's epoll instance).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from dataclasses import dataclass, field

from tend import daemon
from tend.channel import Channel
from tend.errors import StartupError
from tend.logs import LogError, LogSink
from tend.net import describe_serving, listeners
from tend.pidfile import Pidfile
from tend.privileges import Identity
from tend.serve import LoopFactory, starting
from tend.service import Application
from tend.signals import STOP, Signals, name_of
from tend.supervision import Supervision
from tend.systemd import Notifier
from tend.worker import WorkerPlan, run_worker

log = logging.getLogger("tend")


class WorkerFailedError(StartupError):
    """A worker failed before every worker was ready; it has logged why."""


class Upstream:
    """Whom the supervisor reports to: the launcher waiting for it, and systemd.

    A detached daemon's launcher hears ``MAINPID=`` at once (so it can pass a stop
    signal on), then ``READY=1`` or ``ERROR=``; it tells systemd, as the process systemd
    started. Without a launcher, readiness goes to systemd directly. ``STOPPING=1`` and
    the watchdog always go to systemd.
    """

    def __init__(self, launcher: Channel | None, notifier: Notifier | None) -> None:
        self.launcher = launcher
        self.notifier = notifier

    def started(self) -> None:
        if self.launcher is not None:
            self.launcher.send(MAINPID=os.getpid())

    def ready(self, status: str) -> None:
        if self.launcher is not None:
            self.launcher.send(READY=1, STATUS=status, MAINPID=os.getpid())
            self.launcher.close()
            self.launcher = None
        elif self.notifier is not None:
            self.notifier.ready(status)

    def failed(self, message: str) -> None:
        if self.launcher is not None:
            self.launcher.send(ERROR=message)

    def stopping(self) -> None:
        if self.notifier is not None:
            self.notifier.stopping("stopping")

    def watchdog(self) -> None:
        if self.notifier is not None:
            self.notifier.watchdog()

    def forget(self) -> None:
        """In a forked worker: these are the supervisor's to use, not the worker's."""
        if self.launcher is not None:
            self.launcher.close()
        if self.notifier is not None:
            self.notifier.close()


@dataclass(slots=True)
class _Worker:
    """A worker's descriptors, as the supervisor holds them."""

    number: int
    pid: int
    pidfd: int
    channel: Channel
    log_pipe: int | None
    pending_log: bytes = field(default=b"")


class Supervisor:
    """Runs *application* in workers, from the pidfile to the last worker's exit."""

    def __init__(
        self,
        application: Application,
        *,
        workers: int,
        identity: Identity,
        sink: LogSink,
        upstream: Upstream,
        signals: Signals,
        loop_factory: LoopFactory,
        shutdown_timeout: float,
        max_connections: int = 0,
    ) -> None:
        self.application = application
        self.max_connections = max_connections
        self.count = workers
        self.identity = identity
        self.sink = sink
        self.upstream = upstream
        self.signals = signals
        self.loop_factory = loop_factory
        self.shutdown_timeout = shutdown_timeout
        self.pidfile: Pidfile | None = None
        self.relay_logs = sink.fileno() is not None
        self.core = Supervision(workers, time.monotonic, shutdown_timeout)
        self.workers: dict[int, _Worker] = {}  # by pid
        self.selector: selectors.BaseSelector | None = None
        self.stop_signal: str | None = None
        self.status_line = "running"

    # -- before the workers --------------------------------------------------------------

    def take_pidfile(self, path: str) -> None:
        """Write and lock the pidfile, for as long as this process runs."""
        self.pidfile = Pidfile(path)
        self.pidfile.acquire()

    def bind(self) -> None:
        """Bind every listener, one copy per worker, then run the privileged starts."""
        with starting(self.application):
            for server in listeners(self.application):
                server.listen(self.count)
            self.application.privileged_start_service()
        self.status_line = describe_serving(self.application)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Run the workers until a stop signal and their exit; return the exit status.

        Raises:
            WorkerFailedError: a worker failed before every worker was ready.
            StartupError: a stop signal came before every worker was ready.
        """
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.signals.wakeup_fd, selectors.EVENT_READ, None)
        self._handle_signals()  # any that came during the start-up steps
        try:
            while not self.core.finished:
                for number in self.core.to_start():
                    self._spawn(number)
                self._step()
        finally:
            self.selector.close()
            self.selector = None
        if self.stop_signal is not None and not self.core.reported_ready:
            raise StartupError(f"stopped by {self.stop_signal} before the services were ready")
        if self.core.failure is not None:
            raise WorkerFailedError(self.core.failure)
        return self.core.status

    def _step(self) -> None:
        assert self.selector is not None
        wakeup = self.core.next_wakeup()
        timeout = None if wakeup is None else max(0.0, wakeup - time.monotonic())
        # Log pipes first: a worker writes its log before it says READY or exits, and the
        # supervisor's log must have those lines before it tells anyone.
        events = sorted(
            self.selector.select(timeout),
            key=lambda event: event[0].data is None or event[0].fd != event[0].data.log_pipe,
        )
        for key, _ in events:
            worker = key.data
            if worker is None:
                self._handle_signals()
            elif key.fd == worker.log_pipe:
                self._read_log(worker)
            elif key.fd == worker.channel.fileno():
                self._read_messages(worker)
            elif key.fd == worker.pidfd:
                self._reap(worker)
        self._act()

    def _act(self) -> None:
        """Do what the decisions say now."""
        if self.core.failure is not None and self.core.stop():
            self._signal_workers(signal.SIGTERM)
        if self.core.ready_to_report():
            self.sink.flush()  # whoever waits for ready may read the log next
            self.upstream.ready(self.status_line)
        if self.core.watchdog_due():
            self.upstream.watchdog()
        if self.core.kill_due():
            log.error("workers did not stop in time; killing them.")
            self._signal_workers(signal.SIGKILL)

    def _handle_signals(self) -> None:
        for signal_number in self.signals.take():
            name = name_of(signal_number)
            if signal_number == signal.SIGUSR1:
                log.info("Received SIGUSR1, reopening the log.")
                self.reopen_log()
            elif self.core.stop():
                self.stop_signal = name
                log.info("Received %s, stopping %d worker(s).", name, len(self.workers))
                self.upstream.stopping()
                # New clients must be refused now, not queue on sockets no worker accepts.
                for server in listeners(self.application):
                    if server.listening is not None:
                        server.listening.close()
                self._signal_workers(signal_number)
            else:
                log.warning("Received %s again, passing it on to the workers.", name)
                self._signal_workers(signal_number)

    def reopen_log(self) -> None:
        """Reopen the log file; if that fails, say so and keep the old one."""
        try:
            self.sink.reopen()
        except LogError as error:
            log.warning("cannot reopen the log: %s", error)

    def _signal_workers(self, signal_number: int) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(worker.pidfd, signal_number)

    # -- workers -------------------------------------------------------------------------

    def _spawn(self, number: int) -> None:
        assert self.selector is not None
        ours, theirs = Channel.pair()
        log_read, log_write = os.pipe2(os.O_CLOEXEC) if self.relay_logs else (None, None)
        plan = WorkerPlan(
            number=number,
            application=self.application,
            identity=self.identity,
            loop_factory=self.loop_factory,
            shutdown_timeout=self.shutdown_timeout,
            watchdog_interval=(
                self.upstream.notifier.watchdog_interval()
                if self.upstream.notifier is not None
                else None
            ),
            supervisor_pid=os.getpid(),
            max_connections=self.max_connections,
        )
        self.sink.flush()
        with self.signals.forking():
            pid = daemon.fork()
            if pid == 0:
                worker_signals = self.signals.renew(STOP, ignore=(signal.SIGUSR1,))
        if pid == 0:  # the worker
            status = 1
            try:
                self._forget_in_worker(ours, log_read)
                status = run_worker(plan, theirs, log_write, worker_signals, self.sink)
            finally:
                daemon.exit_child(status)
        theirs.close()
        if log_write is not None:
            os.close(log_write)
        pidfd = os.pidfd_open(pid)
        worker = _Worker(number, pid, pidfd, ours, log_read)
        self.workers[pid] = worker
        self.core.started(number, pid)
        ours.set_blocking(False)
        for fd in (ours.fileno(), log_read, pidfd):
            if fd is not None:
                os.set_blocking(fd, False)
                self.selector.register(fd, selectors.EVENT_READ, worker)
        label = f" as {self.identity}" if self.identity.changes_anything else ""
        log.info("started worker %d (pid %d)%s", number, pid, label)

    def _forget_in_worker(self, *fds: Channel | int | None) -> None:
        """In a fresh worker: close what is the supervisor's alone."""
        # Ctrl-C reaches the supervisor alone, which passes it on once.
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        if self.selector is not None:
            with contextlib.suppress(OSError):
                self.selector.close()
        for other in self.workers.values():
            fds += (other.channel, other.pidfd, other.log_pipe)
        for item in fds:
            if isinstance(item, Channel):
                item.close()
            elif item is not None:
                with contextlib.suppress(OSError):
                    os.close(item)
        if self.pidfile is not None:
            self.pidfile.forget()
        self.upstream.forget()

    def _read_messages(self, worker: _Worker) -> None:
        while True:
            try:
                message = worker.channel.receive()
            except BlockingIOError:
                break
            if message is None:
                self._unregister(worker.channel.fileno())
                worker.channel.close()
                break
            self.core.said(worker.pid, message)

    def _read_log(self, worker: _Worker) -> None:
        assert worker.log_pipe is not None
        try:
            data = os.read(worker.log_pipe, 65536)
        except BlockingIOError:
            return
        if not data:
            self._flush_partial(worker)
            self._forget_fd(worker.log_pipe)
            worker.log_pipe = None
            return
        worker.pending_log += data
        self._write_complete_lines(worker)

    def _write_complete_lines(self, worker: _Worker) -> None:
        complete, _, worker.pending_log = worker.pending_log.rpartition(b"\n")
        if complete:
            self.sink.write_lines(complete.decode(errors="replace").split("\n"))

    def _flush_partial(self, worker: _Worker) -> None:
        if worker.pending_log:
            self.sink.write_lines([worker.pending_log.decode(errors="replace")])
            worker.pending_log = b""

    def _unregister(self, fd: int) -> None:
        if self.selector is not None and fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(fd)

    def _forget_fd(self, fd: int) -> None:
        self._unregister(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _reap(self, worker: _Worker) -> None:
        try:
            _, wait_status = os.waitpid(worker.pid, 0)
        except ChildProcessError:
            wait_status = 0
        # Take what the worker said in its last moments before forgetting its pipes.
        if worker.log_pipe is not None:
            with contextlib.suppress(OSError):
                while data := os.read(worker.log_pipe, 65536):
                    worker.pending_log += data
            self._write_complete_lines(worker)
            self._flush_partial(worker)
            self._forget_fd(worker.log_pipe)
        if not worker.channel.closed:
            self._read_messages(worker)
            self._unregister(worker.channel.fileno())
            worker.channel.close()
        self._forget_fd(worker.pidfd)
        del self.workers[worker.pid]
        exit_ = self.core.exited(worker.pid, os.waitstatus_to_exitcode(wait_status))
        if exit_ is not None:
            log.warning(
                "worker %d (pid %d) exited with %s; starting a new one in %.1f s",
                exit_.number,
                exit_.pid,
                exit_.how,
                exit_.restart_in,
            )

    # -- after -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the listeners (removing socket files bound here) and release the pidfile."""
        for server in listeners(self.application):
            if server.listening is not None:
                server.listening.close()
        if self.pidfile is not None:
            self.pidfile.release()
            self.pidfile = None
