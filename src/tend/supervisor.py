"""The supervising parent: keeps root, owns the pidfile and the log file, runs workers.

When tend drops privileges or runs several workers, the process that bound the sockets
stays behind as a small supervisor, as gunicorn's arbiter does. It does nothing a
worker could be trusted with less: it holds the pidfile (so a clean stop removes it even
from a root-only rundir such as /run, where twistd cannot), writes the workers' log lines
to the rotated log file (so rotation works after the drop, and N workers never race
over one file), restarts a worker that dies, and forwards signals.

It is a plain ``selectors`` loop, not asyncio: a child forked from inside a running event
loop would share the parent's epoll instance and believe a loop is already running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tend.errors import StartupError

log = logging.getLogger("tend")

# A worker that dies is restarted after a pause that doubles, up to this, and falls back
# to the first step once a worker has stayed up for RESTART_RESET seconds.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
RESTART_RESET = 10.0


class WorkerFailedError(StartupError):
    """A worker failed before every worker was ready; it has logged why."""


@dataclass(slots=True)
class Worker:
    """One worker process, as the supervisor sees it."""

    number: int
    pid: int
    control: int  # read end: READY or ERROR lines from the worker
    log_pipe: int | None  # read end: the worker's formatted log lines, if relayed
    pidfd: int
    started: float
    ready: bool = False
    error: str | None = None
    alive: bool = False  # has pinged the watchdog since the supervisor last did
    pending_log: bytes = b""
    control_text: bytes = field(default=b"")


WorkerMain = Callable[[int, int, int | None], int]


class Supervisor:
    """Forks *count* workers and keeps them running until told to stop.

    *worker_main(number, control_fd, log_fd)* runs in each forked child and returns its
    exit status; the child exits with it and never returns here. *write_log_lines*
    takes relayed lines (None: workers log directly); *reopen_log* reopens on SIGUSR1.
    """

    def __init__(
        self,
        count: int,
        worker_main: WorkerMain,
        *,
        relay_logs: bool,
        write_log_lines: Callable[[list[str]], None],
        reopen_log: Callable[[], None],
        flush_log: Callable[[], None],
        shutdown_timeout: float,
        on_ready: Callable[[], None],
        on_stopping: Callable[[], None],
        on_watchdog: Callable[[], object] | None = None,
        identity_label: str = "",
    ) -> None:
        self.count = count
        self.worker_main = worker_main
        self.relay_logs = relay_logs
        self.write_log_lines = write_log_lines
        self.reopen_log = reopen_log
        self.flush_log = flush_log
        self.shutdown_timeout = shutdown_timeout
        self.on_ready = on_ready
        self.on_stopping = on_stopping
        self.on_watchdog = on_watchdog
        self.identity_label = identity_label
        self.workers: dict[int, Worker] = {}  # by pid
        self.selector = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.stopping_since: float | None = None
        self.restarts: dict[int, float] = {}  # worker number -> time to start it
        self.failures: dict[int, int] = {}  # worker number -> consecutive quick deaths
        self.ready_reported = False
        self.killed = False  # SIGKILL sent to workers that overran the stop
        self._dead_before_ready: Worker | None = None
        self.status = 0
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous_handlers: dict[int, object] = {}

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Run the workers until a stop signal and their exit; return the exit status.

        Raises:
            WorkerFailedError: a worker failed before every worker was ready.
        """
        self._install_signals()
        try:
            self.selector.register(self._wake_read, selectors.EVENT_READ, None)
            for number in range(1, self.count + 1):
                self._spawn(number)
            while self.workers or (self.restarts and self.stopping_since is None):
                self._step()
                failure = self._failure_before_ready()
                if failure is not None:
                    self._stop_workers(signal.SIGTERM)
                    self._wait_all(self.shutdown_timeout)
                    raise WorkerFailedError(failure)
                if not self.ready_reported and self._all_ready():
                    self.ready_reported = True
                    self.on_ready()
            return self.status
        finally:
            self._restore_signals()
            self.selector.close()
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _step(self) -> None:
        timeout = self._next_timeout()
        # Log pipes first: a worker writes its log before it says READY or exits, and the
        # supervisor's log must have those lines before it tells anyone.
        events = sorted(
            self.selector.select(timeout),
            key=lambda event: event[0].data is None or event[0].fd != event[0].data.log_pipe,
        )
        for key, _ in events:
            worker = key.data
            if worker is None:
                self._drain_wakeups()
            elif key.fd == worker.control:
                self._read_control(worker)
            elif key.fd == worker.log_pipe:
                self._read_log(worker)
            elif key.fd == worker.pidfd:
                self._reap(worker)
        self._handle_signals()
        self._restart_due()
        if self.stopping_since is not None and not self.killed:
            overrun = time.monotonic() - self.stopping_since
            if overrun > self.shutdown_timeout + 5 and self.workers:
                log.error("workers did not stop in time; killing them.")
                self.killed = True
                self._stop_workers(signal.SIGKILL)
                self.status = 1

    def _next_timeout(self) -> float | None:
        moments = list(self.restarts.values())
        if self.stopping_since is not None and not self.killed:
            moments.append(self.stopping_since + self.shutdown_timeout + 5)
        if not moments:
            return None
        return max(0.0, min(moments) - time.monotonic())

    # -- workers -------------------------------------------------------------------------

    def _spawn(self, number: int) -> None:
        control_read, control_write = os.pipe2(os.O_CLOEXEC)
        log_read, log_write = os.pipe2(os.O_CLOEXEC) if self.relay_logs else (None, None)
        self.flush_log()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                self._become_worker(control_read, log_read)
                status = self.worker_main(number, control_write, log_write)
            finally:
                os._exit(status)
        os.close(control_write)
        if log_write is not None:
            os.close(log_write)
        pidfd = os.pidfd_open(pid)
        worker = Worker(number, pid, control_read, log_read, pidfd, time.monotonic())
        self.workers[pid] = worker
        for fd in (control_read, log_read, pidfd):
            if fd is not None:
                os.set_blocking(fd, False)
                self.selector.register(fd, selectors.EVENT_READ, worker)
        log.info("started worker %d (pid %d)%s", number, pid, self.identity_label)

    def _become_worker(self, *unused: int | None) -> None:
        """In a fresh child: forget the supervisor's signals, pipes and other workers."""
        signal.set_wakeup_fd(-1)
        # What the process did before the supervisor took over (until the worker's event
        # loop installs its own): a stop signal ends the start, SIGUSR1 is ignored.
        for signal_number, handler in self._previous_handlers.items():
            signal.signal(signal_number, handler)  # type: ignore[arg-type]
        # Ctrl-C reaches the supervisor alone, which forwards it once.
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        fds = [self._wake_read, self._wake_write, *unused]
        for other in self.workers.values():
            fds.extend([other.control, other.pidfd])
            if other.log_pipe is not None:
                fds.append(other.log_pipe)
        with contextlib.suppress(OSError):
            self.selector.close()
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _read_control(self, worker: Worker) -> None:
        data = _read_available(worker.control)
        if data is None:
            return
        if not data:
            self._forget_fd(worker.control)
            return
        worker.control_text += data
        _parse_control(worker)
        self._maybe_ping_watchdog()

    def _maybe_ping_watchdog(self) -> None:
        """Ping systemd's watchdog once every worker has pinged since the last time.

        A worker pings from its event loop; one whose loop is stuck holds the pings back,
        and systemd, seeing none, restarts the service.
        """
        workers = self.workers.values()
        if self.on_watchdog is not None and workers and all(w.alive for w in workers):
            self.on_watchdog()
            for worker in workers:
                worker.alive = False

    def _read_log(self, worker: Worker) -> None:
        assert worker.log_pipe is not None
        data = _read_available(worker.log_pipe)
        if data is None:
            return
        if not data:
            self._flush_partial(worker)
            self._forget_fd(worker.log_pipe)
            return
        worker.pending_log += data
        _split_lines(worker, self.write_log_lines)

    def _flush_partial(self, worker: Worker) -> None:
        if worker.pending_log:
            self.write_log_lines([worker.pending_log.decode(errors="replace")])
            worker.pending_log = b""

    def _forget_fd(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _reap(self, worker: Worker) -> None:
        try:
            _, wait_status = os.waitpid(worker.pid, 0)
        except ChildProcessError:
            wait_status = 0
        # Take what the worker said in its last moments before forgetting its pipes.
        if worker.log_pipe is not None:
            with contextlib.suppress(OSError):
                while data := os.read(worker.log_pipe, 65536):
                    worker.pending_log += data
            _split_lines(worker, self.write_log_lines)
            self._flush_partial(worker)
        with contextlib.suppress(OSError):
            while data := os.read(worker.control, 4096):
                worker.control_text += data
        _parse_control(worker, final=True)
        for fd in (worker.control, worker.log_pipe, worker.pidfd):
            if fd is not None:
                self._forget_fd(fd)
        del self.workers[worker.pid]
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0 and self.stopping_since is not None:
            # The exit status tells how the stop went; a worker replaced earlier does not count.
            self.status = 1
        if self.stopping_since is not None or not self.ready_reported:
            if code != 0 and not self.ready_reported and worker.error is None:
                worker.error = f"worker {worker.number} exited with {_describe_exit(code)}"
            self._dead_before_ready = worker if not self.ready_reported else None
            return
        lived = time.monotonic() - worker.started
        failures = 0 if lived > RESTART_RESET else self.failures.get(worker.number, 0) + 1
        self.failures[worker.number] = failures
        delay = 0.0 if failures == 0 else min(RESTART_MAX, RESTART_FIRST * 2 ** (failures - 1))
        log.warning(
            "worker %d (pid %d) exited with %s; starting a new one in %.1f s",
            worker.number,
            worker.pid,
            _describe_exit(code),
            delay,
        )
        self.restarts[worker.number] = time.monotonic() + delay

    def _restart_due(self) -> None:
        now = time.monotonic()
        for number, when in list(self.restarts.items()):
            if self.stopping_since is not None:
                self.restarts.clear()
                return
            if when <= now:
                del self.restarts[number]
                self._spawn(number)

    def _failure_before_ready(self) -> str | None:
        if self.ready_reported:
            return None
        for worker in [*self.workers.values(), self._dead_before_ready]:
            if worker is not None and worker.error is not None:
                return worker.error
        return None

    def _all_ready(self) -> bool:
        return len(self.workers) == self.count and all(w.ready for w in self.workers.values())

    def _stop_workers(self, signal_number: int) -> None:
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            # New clients must be refused now, not queue on sockets no worker accepts.
            self.on_stopping()
        self.restarts.clear()
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal_number)

    def _wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            self._step()
        if self.workers:
            self._stop_workers(signal.SIGKILL)
            while self.workers:
                self._step()

    # -- signals -------------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_write)
        for signal_number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._previous_handlers[signal_number] = signal.signal(signal_number, self._on_signal)

    def _restore_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        for signal_number, handler in self._previous_handlers.items():
            signal.signal(signal_number, handler)  # type: ignore[arg-type]

    def _on_signal(self, signal_number: int, frame: object) -> None:
        # Only record: the loop acts once select() wakes up.
        self.signals.append(signal_number)

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_read, 4096):
                pass

    def _handle_signals(self) -> None:
        while self.signals:
            signal_number = self.signals.pop(0)
            name = signal.Signals(signal_number).name
            if signal_number == signal.SIGUSR1:
                log.info("Received SIGUSR1, reopening the log.")
                self.reopen_log()
                continue
            if self.stopping_since is None:
                log.info("Received %s, stopping %d worker(s).", name, len(self.workers))
            else:
                log.warning("Received %s again, passing it on to the workers.", name)
            self._stop_workers(signal_number)


def _read_available(fd: int) -> bytes | None:
    """Read what a pipe holds: None if nothing yet, b"" at end-of-file."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def _parse_control(worker: Worker, final: bool = False) -> None:
    """Act on the complete lines a worker sent (all of them, once it has exited)."""
    if final and worker.control_text and not worker.control_text.endswith(b"\n"):
        worker.control_text += b"\n"
    while b"\n" in worker.control_text:
        line, worker.control_text = worker.control_text.split(b"\n", 1)
        text = line.decode(errors="replace")
        if text.startswith("READY"):
            worker.ready = True
        elif text == "WATCHDOG":
            worker.alive = True
        elif text.startswith("ERROR "):
            worker.error = text.removeprefix("ERROR ")


def _split_lines(worker: Worker, write: Callable[[list[str]], None]) -> None:
    complete, _, worker.pending_log = worker.pending_log.rpartition(b"\n")
    if complete:
        write(complete.decode(errors="replace").split("\n"))


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"
