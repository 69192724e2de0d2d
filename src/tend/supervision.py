"""The supervisor's decisions: when to start a worker, when to kill, when to report.

A core with an injected clock and no I/O, so every decision can be tested without a
process: supervisor.py tells it what happened (a worker started, said READY, ERROR or
WATCHDOG, exited; a stop was asked for) and asks what to do now (which workers to
start, whether to kill, whether to report ready or ping systemd's watchdog) and when
to wake up next.

The rules, as gunicorn's arbiter has them: a worker that dies while the others serve is
started again after a pause that doubles (0.5 s, 1 s, ... up to 30 s) while workers keep
dying young, and falls back to the first step once one has lived 10 s. Before every
worker is ready, any failure fails the whole start. A stop passes the signal on; workers
still running when the drain, its overrun and a grace are over are killed, once. A worker
that has not said READY within the start timeout (and a grace: the worker names the slow
service itself when its loop can), or that has been silent for the worker timeout after
it (gunicorn's ``--timeout``: its loop is stuck, or it was stopped), is killed.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass

from tend.channel import Message

RESTART_FIRST = 0.5
RESTART_MAX = 30.0
RESTART_RESET = 10.0

# How long a worker's services may overrun the drain deadline before the worker gives up
# on them and resets what is left (serve.py).
STOP_OVERRUN = 5.0

# How much longer the supervisor waits before it kills a worker: a worker must have reset
# its connections itself first, since a killed process's sockets end with a clean FIN.
KILL_GRACE = 2.0

# How much longer than the start timeout a worker may take to say READY before it is
# killed: a worker whose loop still runs names the service that did not finish first.
START_GRACE = 2.0

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Limits:
    """How long things may take, in seconds. A start or worker timeout of 0 is no limit; a
    shutdown timeout of 0 resets open connections at once."""

    shutdown_timeout: float = 10.0  # --shutdown-timeout
    start_timeout: float = 60.0  # --start-timeout
    worker_timeout: float = 30.0  # --worker-timeout

    @property
    def ping_interval(self) -> float | None:
        """How often a worker should say it is alive for the worker timeout to hold."""
        return self.worker_timeout / 4 if self.worker_timeout else None


@dataclass(slots=True)
class WorkerRecord:
    """One worker process, as the supervisor's decisions see it."""

    number: int
    pid: int
    started: float
    ready: bool = False
    pinged: bool = False  # has pinged the watchdog since systemd was last pinged
    error: str | None = None
    last_heard: float = 0.0  # when it last said anything
    doomed: bool = False  # overdue: killed, not to be killed again


@dataclass(frozen=True, slots=True)
class Exit:
    """What to say about a worker that exited while the others were serving."""

    number: int
    pid: int
    how: str  # "status 3", "signal SIGKILL"
    restart_in: float
    error: str | None = None  # what the worker said went wrong (ERROR=), if it did


# The code of a worker whose exit status was lost (something else reaped it): a failure.
UNKNOWN_EXIT = 256


def describe_exit(code: int) -> str:
    """How a process ended, from ``os.waitstatus_to_exitcode``: ``status 3``, ``signal SIGKILL``."""
    if code == UNKNOWN_EXIT:
        return "an unknown status (reaped by other code)"
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


class Supervision:
    """Decides, for *count* workers, from what happened and what the *clock* says."""

    def __init__(self, count: int, clock: Clock, limits: Limits) -> None:
        self.count = count
        self.clock = clock
        self.limits = limits
        self.shutdown_timeout = limits.shutdown_timeout
        self.workers: dict[int, WorkerRecord] = {}  # by pid
        now = clock()
        self.restarts: dict[int, float] = {number: now for number in range(1, count + 1)}
        self.quick_deaths: dict[int, int] = {}  # worker number -> deaths in a row, young
        self.stopping_since: float | None = None
        self.killed = False
        self.reported_ready = False
        self.failure: str | None = None  # why the start failed
        self.status = 0
        # Whether how these workers stop counts in tend's exit status: not for a generation
        # a reload replaced, nor for a reload's that failed.
        self.status_counts = True

    # -- what happened -------------------------------------------------------------------

    def started(self, number: int, pid: int) -> None:
        self.restarts.pop(number, None)
        now = self.clock()
        self.workers[pid] = WorkerRecord(number, pid, now, last_heard=now)

    def said(self, pid: int, message: Message) -> None:
        """A worker's message: READY, WATCHDOG or ERROR."""
        worker = self.workers.get(pid)
        if worker is None:
            return
        worker.last_heard = self.clock()
        if message.ready:
            worker.ready = True
        if message.watchdog:
            worker.pinged = True
        if message.error is not None:
            worker.error = message.error
            if not self.reported_ready and self.failure is None:
                self.failure = message.error

    def exited(self, pid: int, code: int) -> Exit | None:
        """A worker exited with *code* (``os.waitstatus_to_exitcode``).

        Returns what to log when it is to be started again, else None.
        """
        worker = self.workers.pop(pid, None)
        if worker is None:
            return None
        if self.stopping_since is not None:
            # The exit status tells how the stop went; a worker replaced earlier does not count.
            if code != 0:
                self.status = 1
            return None
        if not self.reported_ready:
            if self.failure is None:
                self.failure = worker.error or (
                    f"worker {worker.number} exited with {describe_exit(code)} before it was ready"
                )
            return None
        young = self.clock() - worker.started <= RESTART_RESET
        delay = self._back_off(worker.number, young)
        return Exit(worker.number, pid, describe_exit(code), delay, worker.error)

    def could_not_start(self, number: int, reason: str) -> float | None:
        """Worker *number* could not even be forked (*reason*: out of processes, say).

        Before every worker was ready the start fails; after, it counts as a worker that
        died young: tried again after the back-off, whose delay this returns.
        """
        if self.stopping_since is not None:
            return None
        if not self.reported_ready:
            if self.failure is None:
                self.failure = f"cannot start worker {number}: {reason}"
            return None
        return self._back_off(number, young=True)

    def _back_off(self, number: int, young: bool) -> float:
        """Schedule worker *number*'s start again: at once after a long life, else after a
        pause that doubles with each young death in a row; return the pause."""
        deaths = self.quick_deaths.get(number, 0) + 1 if young else 0
        self.quick_deaths[number] = deaths
        delay: float = 0.0 if deaths == 0 else min(RESTART_MAX, RESTART_FIRST * 2 ** (deaths - 1))
        self.restarts[number] = self.clock() + delay
        return delay

    def stop(self) -> bool:
        """A stop was asked for (or the start failed); True the first time."""
        self.restarts.clear()
        if self.stopping_since is not None:
            return False
        self.stopping_since = self.clock()
        return True

    # -- what to do ----------------------------------------------------------------------

    def to_start(self) -> list[int]:
        """The worker numbers to start now."""
        if self.stopping_since is not None or self.failure is not None:
            return []
        now = self.clock()
        return sorted(number for number, when in self.restarts.items() if when <= now)

    def ready_to_report(self) -> bool:
        """True once, when every worker has said READY before anything failed or stopped."""
        if self.reported_ready or self.stopping_since is not None or self.failure is not None:
            return False
        workers = self.workers.values()
        if len(workers) == self.count and all(worker.ready for worker in workers):
            self.reported_ready = True
            return True
        return False

    def watchdog_due(self) -> bool:
        """True when every ready worker has pinged since the last time this said True.

        One worker whose loop is stuck holds the pings back, and systemd, hearing none,
        restarts the service. A worker still starting (a replacement) does not: it pings
        only once ready, and the start timeout bounds its start; with none ready at all,
        nothing is served and nothing is said.
        """
        workers = [worker for worker in self.workers.values() if worker.ready]
        if not workers or not all(worker.pinged for worker in workers):
            return False
        for worker in workers:
            worker.pinged = False
        return True

    def kill_due(self) -> bool:
        """True once, when workers outlive the stop's drain and its overrun."""
        if self.stopping_since is None or self.killed or not self.workers:
            return False
        if self.clock() < self._kill_at():
            return False
        self.killed = True
        self.status = 1
        return True

    def overdue(self) -> list[WorkerRecord]:
        """Workers to kill now, each once: not ready in time, or silent for too long.

        A worker not ready in time before the first READY fails the whole start.
        """
        if self.stopping_since is not None:
            return []
        now = self.clock()
        found = []
        for worker in self.workers.values():
            due = self._due(worker)
            if not worker.doomed and due is not None and now >= due:
                worker.doomed = True
                found.append(worker)
                if not worker.ready and not self.reported_ready and self.failure is None:
                    self.failure = (
                        f"worker {worker.number} did not start within "
                        f"{self.limits.start_timeout:g} s, and its event loop did not answer"
                    )
        return found

    def _due(self, worker: WorkerRecord) -> float | None:
        if not worker.ready:
            timeout = self.limits.start_timeout
            return worker.started + timeout + START_GRACE if timeout else None
        timeout = self.limits.worker_timeout
        return worker.last_heard + timeout if timeout else None

    @property
    def finished(self) -> bool:
        """Every worker is gone and none is to start again."""
        return not self.workers and (self.stopping_since is not None or self.failure is not None)

    def next_wakeup(self) -> float | None:
        """The clock time of the next decision that depends on time alone, if any."""
        moments = [] if self.stopping_since is not None else list(self.restarts.values())
        if self.stopping_since is not None and not self.killed and self.workers:
            moments.append(self._kill_at())
        if self.stopping_since is None:
            for worker in self.workers.values():
                due = self._due(worker)
                if due is not None and not worker.doomed:
                    moments.append(due)
        return min(moments, default=None)

    def _kill_at(self) -> float:
        assert self.stopping_since is not None
        return self.stopping_since + self.shutdown_timeout + STOP_OVERRUN + KILL_GRACE
