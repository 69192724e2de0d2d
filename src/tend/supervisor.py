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
import functools
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tend import __version__, daemon
from tend.channel import Channel
from tend.control import Connection, ControlServer, control_path
from tend.endpoints import ListenError, Listening, endpoint_key, inherited_listening
from tend.errors import StartupError, TendError, describe_error, quote
from tend.files import working_directory
from tend.logs import LogError, LogSink
from tend.logs.rotating import RECORD_END
from tend.net import describe_serving, listeners
from tend.pidfile import Pidfile
from tend.privileges import Identity
from tend.serve import LoopFactory, starting
from tend.service import Application
from tend.signals import STOP, WORKER_CATCHES, WORKER_IGNORES, Signals, name_of
from tend.sources import TreeSource
from tend.supervision import START_GRACE, UNKNOWN_EXIT, Limits, Supervision, describe_exit
from tend.systemd import Notifier
from tend.worker import WorkerPlan, run_worker

if TYPE_CHECKING:
    from tend.upgrade import Handover, Successor

log = logging.getLogger("tend")


# A dead worker's own listening socket is kept for its replacement when that comes sooner
# than this, in seconds; its queued clients wait rather than being refused.
COPY_KEPT_FOR = 1.0
# The longest log record relayed from a worker, in bytes; past it the rest is dropped.
LONGEST_RELAYED_RECORD = 256 * 1024
# tendctl reload/upgrade requests that may wait for their outcome at once; more are refused.
MAX_WAITING = 64


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

    def reloading(self) -> None:
        """A reload began: systemd's Type=notify-reload wants the time it began."""
        if self.notifier is not None:
            self.notifier.send(
                "RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", "STATUS=reloading"
            )

    def handed_over(self, pid: int) -> None:
        """An upgrade is done: systemd is to watch the successor from now on."""
        if self.notifier is not None:
            self.notifier.send(f"MAINPID={pid}", "STATUS=upgraded")

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


@dataclass(slots=True, eq=False)
class Generation:
    """One build of the tree and the workers that run it; a reload makes the next one."""

    number: int
    application: Application
    core: Supervision
    status_line: str
    listenings: list[Listening]  # what its servers listen on, in tree order
    started: float = field(default_factory=time.time)
    workers: dict[int, _Worker] = field(default_factory=dict)  # by pid


@dataclass(slots=True)
class _Worker:
    """A worker's descriptors, as the supervisor holds them, and what it last reported."""

    generation: Generation
    number: int
    pid: int
    pidfd: int
    channel: Channel
    log_pipe: int | None
    pending_log: bytes = field(default=b"")
    skipping_log: bool = False  # the rest of an over-long record is being dropped
    started: float = field(default_factory=time.time)
    connections: int = 0  # open, as of its last ping
    served: int = 0  # since it started, as of its last ping
    unsignalable: bool = False  # a signal to it failed with EPERM: it is asked on its channel


@dataclass(slots=True)
class _Asked:
    """A reload or an upgrade asked for before it could begin: the latest reason, and
    everyone waiting for its outcome."""

    why: str
    replies: list[Reply] = field(default_factory=list)

    @classmethod
    def again(cls, held: _Asked | None, why: str, reply: Reply | None) -> _Asked:
        """*held*, or a new one, asked once more for *why*; *reply* waits for it too."""
        asked = cls(why) if held is None else held
        asked.why = why
        if reply is not None:
            asked.replies.append(reply)
        return asked

    def reply_to_all(self, ok: bool, line: str) -> None:
        for reply in self.replies:
            reply(ok, line)


@dataclass(slots=True)
class _Trial:
    """A reload's trial build: the new tree built in a forked child first, where an app
    file that blocks at import, or takes longer than --start-timeout, holds nothing but
    that child (killed at the deadline), never the supervisor's loop."""

    pid: int
    pidfd: int
    channel: Channel
    deadline: float  # monotonic; 0 for none


Reply = Callable[[bool, str], None]


class Supervisor:
    """Runs the tree in workers, from the pidfile to the last worker's exit, and reloads it.

    A reload (SIGHUP, ``tendctl reload``) first builds the new tree in a forked child (a
    trial, killed past --start-timeout, so that code which blocks at import never holds
    this loop), then builds it again from *source* here, binds what
    the new tree listens on that the old one did not (as this process's user, so a port
    below 1024 works), starts a new generation of workers on the same sockets, and only
    once every new worker is ready stops the old generation with the usual drain. A new
    tree that cannot be built, or a new worker that fails, changes nothing: the old
    generation goes on serving and the failure is one line.
    """

    def __init__(
        self,
        application: Application,
        *,
        source: TreeSource | None = None,
        workers: int,
        identity: Identity,
        sink: LogSink,
        upstream: Upstream,
        signals: Signals,
        loop_factory: LoopFactory,
        limits: Limits,
        handover: Handover | None = None,
        first_cwd: str | None = None,
        chrooted: bool = False,
        max_connections: int = 0,
    ) -> None:
        self.application = application
        self.max_connections = max_connections  # per worker; 0: from the open-file limit
        self.source = source
        self.handover = handover  # an upgrade's: the sockets the old tend passed on
        # Where tend was started, as the shell named it: an upgrade runs the program there.
        self.first_cwd = first_cwd or working_directory()
        self.successor: Successor | None = None
        self.successor_deadline = 0.0
        self.chrooted = chrooted
        self.upgrade_replies: list[Reply] = []
        self.handed_over = False  # an upgrade is done: socket files belong to the successor
        self.count = workers
        self.identity = identity
        self.sink = sink
        self.upstream = upstream
        self.signals = signals
        self.loop_factory = loop_factory
        self.limits = limits
        self.pidfile: Pidfile | None = None
        self.taking_over = False  # an upgrade's new program: the pidfile is taken once ready
        self.control: ControlServer | None = None
        self.relay_logs = sink.fileno() is not None
        self.workers: dict[int, _Worker] = {}  # by pid, of every generation
        self.listenings: list[Listening] = []  # everything bound, of every generation
        self.current: Generation | None = None
        self.incoming: Generation | None = None  # a reload's, until it is ready
        self.retiring: list[Generation] = []  # draining after a reload, or failed
        self.generations_made = 0
        self.reload_replies: list[Reply] = []
        # Asked to reload or upgrade while tend starts or during a reload: held, and begun
        # once it can be, a reload first (after a reload, one more follows it, so that
        # what changed meanwhile is read too).
        self.reload_held: _Asked | None = None
        self.upgrade_held: _Asked | None = None
        self.trial: _Trial | None = None  # a reload's trial build, in a child, under way
        self.selector: selectors.BaseSelector | None = None
        self.stop_signal: str | None = None
        self.stopped_before_failure = False
        self.started = time.time()
        self.watched: dict[str, tuple[int, int, int]] | None = None  # --reload: file -> stamp
        self.next_look = 0.0

    @property
    def core(self) -> Supervision:
        """The decisions about the generation serving now."""
        assert self.current is not None
        return self.current.core

    @property
    def ready(self) -> bool:
        """Whether tend has started: every worker of the serving generation said READY."""
        return self.current is not None and self.current.core.reported_ready

    @property
    def reloading(self) -> bool:
        """A reload is under way: its trial build, or its new generation starting."""
        return self.incoming is not None or self.trial is not None

    @property
    def can_begin(self) -> bool:
        """Whether a reload or an upgrade could begin now: tend has started, none is under
        way, and it is not stopping."""
        return (
            self.ready
            and not self.reloading
            and self.successor is None
            and self.stop_signal is None
        )

    @property
    def status_line(self) -> str:
        return self.current.status_line if self.current is not None else "running"

    # -- before the workers --------------------------------------------------------------

    def take_pidfile(self, path: str) -> None:
        """Write and lock the pidfile, for as long as this process runs; open the control
        socket beside it (tendctl can then ask, and hear how it went).

        The new program of an upgrade takes both over only once it serves: until then
        they name the tend it replaces, which a stop meanwhile must reach.
        """
        self.pidfile = Pidfile(path)
        if self.handover is not None:
            self.taking_over = True
            return
        self.pidfile.acquire()
        self._open_control(take_over=False)

    def _take_over(self) -> None:
        """An upgrade's new program is ready: the pidfile and the control socket are its own."""
        assert self.pidfile is not None
        self.taking_over = False
        self.pidfile.acquire(take_over=True)
        self._open_control(take_over=True)

    def _open_control(self, *, take_over: bool) -> None:
        assert self.pidfile is not None
        try:
            self.control = ControlServer(control_path(self.pidfile.path), take_over=take_over)
        except (TendError, OSError) as error:
            log.warning("no control socket, tendctl will send signals: %s", error)
            return
        if self.selector is not None:
            self.selector.register(self.control.fileno(), selectors.EVENT_READ, self._accept)

    def bind(self) -> None:
        """Bind every listener, one copy per worker, then run the privileged starts."""
        self.current = self._make_generation(self.application)

    def _make_generation(self, application: Application) -> Generation:
        """Bind what *application* listens on (reusing what is bound), privileged-start it.

        Servers take the sockets of the generation serving now where their endpoints are
        the same (in tree order, so two ``tcp:0`` servers keep their two ports); the rest
        are bound now, and closed again if anything fails.
        """
        reusable: dict[str, list[Listening]] = {}
        for listening in self.current.listenings if self.current is not None else ():
            reusable.setdefault(endpoint_key(listening.endpoint), []).append(listening)
        bound: list[Listening] = []
        taken: list[Listening] = []
        try:
            with starting(application):
                for server in listeners(application):
                    key = endpoint_key(server.endpoint)
                    kept = reusable.get(key)
                    passed = None
                    if not kept and self.handover is not None:
                        passed = self.handover.take(key)
                    if kept:
                        listening = kept.pop(0)
                        server.adopt(listening)
                    elif passed is not None:
                        listening = inherited_listening(server.endpoint, passed, self.count)
                        server.adopt(listening)
                        bound.append(listening)
                    else:
                        listening = server.listen(self.count)
                        bound.append(listening)
                    taken.append(listening)
                application.privileged_start_service()
            if self.handover is not None:
                self.handover.close_unused()
        except BaseException:
            for listening in bound:
                listening.close()
            raise
        self.listenings.extend(bound)
        self.generations_made += 1
        return Generation(
            self.generations_made,
            application,
            Supervision(self.count, time.monotonic, self.limits),
            describe_serving(application),
            taken,
        )

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Run the workers until a stop signal and their exit; return the exit status.

        Raises:
            WorkerFailedError: a worker failed before every worker was ready.
            StartupError: a stop signal came before every worker was ready.
        """
        assert self.current is not None
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.signals.wakeup_fd, selectors.EVENT_READ, None)
        if self.control is not None:
            self.selector.register(self.control.fileno(), selectors.EVENT_READ, self._accept)
        self._handle_signals()  # any that came during the start-up steps
        try:
            while not self._finished():
                for generation in self._live():
                    for number in generation.core.to_start():
                        self._spawn(generation, number)
                self._step()
        finally:
            self.selector.close()
            self.selector = None
            start_failure = self.core.failure if not self.core.reported_ready else None
            self._drop_held(f"tend failed to start: {start_failure}" if start_failure else None)
            for reply in self.reload_replies:
                reply(False, "tend stopped before the reload was done")
        failed = self.core.failure is not None and not self.core.reported_ready
        if failed and not self.stopped_before_failure:
            assert self.core.failure is not None
            raise WorkerFailedError(self.core.failure)
        if self.stop_signal is not None and not self.core.reported_ready:
            raise StartupError(f"stopped by {self.stop_signal} before the services were ready")
        return max(
            [self.core.status, *(g.core.status for g in self.retiring if g.core.status_counts)]
        )

    def _live(self) -> list[Generation]:
        """The generations whose workers should run: the current one and a reload's."""
        return [g for g in (self.current, self.incoming) if g is not None]

    def _finished(self) -> bool:
        # A reload's generation counts too: stopped while it started, its workers may end
        # killed, with no ERROR= that would have failed (and cleared) it.
        if self.current is None:
            return False
        if all(generation.core.finished for generation in self._live()) and not self.workers:
            return True
        return self._only_unkillable_left()

    def _only_unkillable_left(self) -> bool:
        """Stopping, past the kill, with only workers the kernel would not let this process
        signal: it exits. Orphaned, they are woken (SIGCONT), hear the channel hang up and
        stop if they still can; what is left is the service manager's (systemd kills the
        rest of the unit's cgroup: it holds CAP_KILL)."""
        if self.stop_signal is None or not self.workers:
            return False
        if not all(worker.unsignalable for worker in self.workers.values()):
            return False
        generations = {id(worker.generation): worker.generation for worker in self.workers.values()}
        if not all(generation.core.killed for generation in generations.values()):
            return False
        log.error(
            "cannot kill %d worker(s) that did not stop; exiting, and leaving them to the "
            "service manager (give the supervisor CAP_KILL to kill them itself)",
            len(self.workers),
        )
        return True

    def _step(self) -> None:
        assert self.selector is not None
        moments = [
            moment
            for generation in (*self._live(), *self.retiring)
            if (moment := generation.core.next_wakeup()) is not None
        ]
        if self.control is not None:
            # A connection waiting for a reload's outcome has no deadline of its own.
            moments.extend(c.deadline for c in self.control.connections.values() if not c.waiting)
        if self.watched is not None:
            moments.append(self.next_look)
        if self.successor is not None:
            moments.append(self.successor_deadline)
        if self.trial is not None and self.trial.deadline:
            moments.append(self.trial.deadline)
        wakeup = min(moments, default=None)
        timeout = None if wakeup is None else max(0.0, wakeup - time.monotonic())
        # Log pipes first: a worker writes its log before it says READY or exits, and the
        # supervisor's log must have those lines before it tells anyone.
        events = sorted(
            self.selector.select(timeout),
            key=lambda event: (
                not (isinstance(event[0].data, _Worker) and event[0].fd == event[0].data.log_pipe)
            ),
        )
        registered = self.selector.get_map()
        for key, _ in events:
            if registered.get(key.fd) is not key:
                # Unregistered by an earlier event of this batch (a stop that ended the
                # trial build or the upgrade, a worker reaped), or its number reused since.
                continue
            worker = key.data
            if worker is None:
                self._handle_signals()
            elif callable(worker):  # the control socket and its peers
                worker()
            elif key.fd == worker.log_pipe:
                self._read_log(worker)
            elif key.fd == worker.channel.fileno():
                self._read_messages(worker)
            elif key.fd == worker.pidfd:
                self._reap(worker)
        self._act()

    def _act(self) -> None:
        """Do what the decisions say now."""
        for generation in (*self._live(), *self.retiring):
            core = generation.core
            if core.failure is not None and core.stop():
                self._signal_workers(signal.SIGTERM, generation)
            if core.kill_due():
                log.error("workers did not stop in time; killing them.")
                self._signal_workers(signal.SIGKILL, generation)
            self._kill_overdue(generation)
        if self.core.ready_to_report():
            if self.taking_over:
                self._take_over()
            self.sink.flush()  # whoever waits for ready may read the log next
            self.upstream.ready(self.status_line)
        if self.incoming is not None:
            if self.incoming.core.ready_to_report():
                self._promote()
            elif self.incoming.core.failure is not None:
                failed, self.incoming = self.incoming, None
                failed.core.status_counts = False
                self.retiring.append(failed)
                self._close_unused()
                self._reload_done(False, f"reload failed: {failed.core.failure}")
        if self.core.watchdog_due():
            self.upstream.watchdog()
        self.retiring = [g for g in self.retiring if g.workers]
        if self.watched is not None and time.monotonic() >= self.next_look:
            self._look_at_files()
        if (
            self.trial is not None
            and self.trial.deadline
            and time.monotonic() > self.trial.deadline
        ):
            self._end_trial(kill=True)
            assert self.source is not None
            self._reload_done(
                False,
                f"reload failed: {self.source.description} did not finish building within "
                f"{self.limits.start_timeout:g} s (--start-timeout)",
            )
        if self.successor is not None and time.monotonic() > self.successor_deadline:
            self._upgrade_failed(
                f"the new tend program was not ready within "
                f"{self.limits.start_timeout + START_GRACE:g} s"
            )
        self._begin_held()  # last: what ended above may have freed the way
        if self.control is not None:
            now = time.monotonic()
            for connection in list(self.control.connections.values()):
                if now > connection.deadline and not connection.waiting:
                    self._drop(connection)

    def _kill_overdue(self, generation: Generation) -> None:
        for late in generation.core.overdue():
            if late.ready:
                log.error(
                    "worker %d (pid %d) has not answered for %g s; killing it",
                    late.number,
                    late.pid,
                    self.limits.worker_timeout,
                )
            else:
                log.error(
                    "worker %d (pid %d) did not start within %g s; killing it",
                    late.number,
                    late.pid,
                    self.limits.start_timeout,
                )
            worker = self.workers.get(late.pid)
            if worker is not None:
                self._send_signal(worker, signal.SIGKILL)

    def _handle_signals(self) -> None:
        for signal_number in self.signals.take():
            name = name_of(signal_number)
            if signal_number == signal.SIGUSR1:
                log.info("Received SIGUSR1, reopening the log.")
                self.reopen_log()
            elif signal_number == signal.SIGHUP:
                self.reload(f"Received {name}")
            elif signal_number == signal.SIGUSR2:
                self.upgrade(f"Received {name}")
            elif signal_number in STOP:
                self.stop(name, f"Received {name}")

    def stop(self, name: str, why: str) -> None:
        """Stop every generation, gracefully the first time, at once the second."""
        if self.stop_signal is None:
            self.stop_signal = name
            # Which came first decides what the start is said to have died of.
            self.stopped_before_failure = self.core.failure is None
            log.info("%s, stopping %d worker(s).", why, len(self.workers))
            self._drop_held(None)  # what was held will not happen: say so now
            if self.successor is not None:  # an upgrade under way: the stop is for both
                self._upgrade_failed("tend is stopping")
            if self.trial is not None:  # a reload's trial build: it is called off
                self._end_trial(kill=True).channel.close()
            if not self.handed_over:  # else systemd watches the successor, which serves on
                self.upstream.stopping()
            for generation in self._live():
                generation.core.stop()
            # New clients must be refused now, not queue on sockets no worker accepts; after
            # an upgrade the successor accepts on them, and their files are its own.
            for listening in self.listenings:
                if self.handed_over:
                    listening.forget()
                else:
                    listening.close()
            # SIGTERM whatever came: a worker leaves the terminal's signals to us.
            self._signal_workers(signal.SIGTERM)
        else:
            log.warning("%s again, stopping the workers at once.", why)
            # On the channel, not as a signal: a worker takes a SIGTERM that comes again
            # for the same stop (systemd's and tend's both reach it), never for "at once".
            for worker in self.workers.values():
                worker.channel.send(STOP="now")

    # -- the control socket ------------------------------------------------------------------

    def _accept(self) -> None:
        assert self.control is not None
        assert self.selector is not None
        while (connection := self.control.accept()) is not None:
            self.selector.register(
                connection.fileno(), selectors.EVENT_READ, functools.partial(self._ask, connection)
            )

    def _drop(self, connection: Connection) -> None:
        assert self.control is not None
        self._unregister(connection.fileno())
        self.control.connections.pop(connection.fileno(), None)
        connection.close()

    def _ask(self, connection: Connection) -> None:
        try:
            command = connection.read()
        except ValueError:
            self._drop(connection)
            return
        if command is None:
            return
        self._unregister(connection.fileno())
        assert self.control is not None
        waiting = sum(other.waiting for other in self.control.connections.values())
        connection.waiting = True

        def answer(reply: dict[str, object]) -> None:
            assert self.control is not None
            self.control.connections.pop(connection.fileno(), None)
            connection.answer(reply)

        if command in ("reload", "upgrade") and waiting >= MAX_WAITING:
            # Each waits, holding a descriptor, for as long as the start or reload takes.
            answer({"ok": False, "message": f"cannot {command}: {waiting} requests wait already"})
        elif command == "status":
            answer({"ok": True, **self.describe()})
        elif command == "reload":
            self.reload(
                "Asked by tendctl",
                lambda ok, line: answer({"ok": ok, "message": line}),
            )
        elif command == "upgrade":
            self.upgrade(
                "Asked by tendctl",
                lambda ok, line: answer({"ok": ok, "message": line}),
            )
        elif command == "stop":
            answer({"ok": True, "message": "stopping", "pid": os.getpid()})
            self.stop("SIGTERM", "Asked by tendctl to stop")
        elif command == "reopen-logs":
            try:
                self.sink.reopen()
            except LogError as error:
                answer({"ok": False, "message": f"cannot reopen the log: {error}"})
            else:
                log.info("Asked by tendctl, reopened the log.")
                answer({"ok": True, "message": "reopened the log"})
        else:
            answer({"ok": False, "message": f"cannot {command} yet"})

    def describe(self) -> dict[str, object]:
        """What ``tendctl status`` shows: this tend, its generation, workers and listeners."""
        assert self.current is not None
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime": time.time() - self.started,
            "pidfile": self.pidfile.path if self.pidfile is not None else None,
            "generation": self.current.number,
            "generation_started": self.current.started,
            "reloading": self.incoming is not None,
            "status": self.status_line,
            "listeners": [
                {"endpoint": str(listening.endpoint), "addresses": listening.addresses}
                for listening in self.current.listenings
            ],
            "workers": [
                {
                    "number": worker.number,
                    "pid": worker.pid,
                    "generation": worker.generation.number,
                    "started": worker.started,
                    "uptime": time.time() - worker.started,
                    "connections": worker.connections,
                    "served": worker.served,
                    "ready": _is_ready(worker),
                }
                for worker in sorted(
                    self.workers.values(), key=lambda w: (w.generation.number, w.number)
                )
            ],
        }

    def reopen_log(self) -> None:
        """Reopen the log file; if that fails, say so and keep the old one."""
        try:
            self.sink.reopen()
        except LogError as error:
            log.warning("cannot reopen the log: %s", error)

    # -- reload ----------------------------------------------------------------------------

    def reload(self, why: str, reply: Reply | None = None) -> None:
        """Build the tree again and start a generation of workers on it; see the class.

        *reply(ok, line)* is called once the reload has succeeded or failed.
        """
        if self.stop_signal is None and self.source is not None:
            if self.reloading:
                log.info("%s during a reload: another reload follows this one.", why)
                self.reload_held = _Asked.again(self.reload_held, why, reply)
                return
            if self.successor is None and self.core.failure is None and not self.ready:
                log.info("%s while tend is starting: it reloads once ready.", why)
                self.reload_held = _Asked.again(self.reload_held, why, reply)
                return
        unable = None if self.source is not None else "this tree cannot be built again"
        if self._refused("reload", why, reply, unable):
            return
        assert self.source is not None
        if reply is not None:
            self.reload_replies.append(reply)
        log.info("%s, reloading %s.", why, self.source.description)
        if self.watched is not None:
            # What this reload reads is what the files hold now: seen, whatever asked.
            self.watched = _stamps(self.watched)
        self.upstream.reloading()
        self.reopen_log()
        self._start_trial()

    def _start_trial(self) -> None:
        """Build the new tree in a forked child first (see _Trial); on its success, here."""
        assert self.source is not None
        assert self.selector is not None
        try:
            ours, theirs = Channel.pair()
        except OSError as error:
            self._reload_done(False, f"reload failed: cannot try the new tree: {error.strerror}")
            return
        self.sink.flush()
        try:
            with self.signals.forking():
                pid = daemon.fork()
                if pid == 0:
                    try:
                        self.signals.default_for_exec()  # none of the supervisor's handlers
                    except BaseException:
                        daemon.exit_now(1)
        except OSError as error:
            ours.close()
            theirs.close()
            self._reload_done(False, f"reload failed: cannot try the new tree: {error.strerror}")
            return
        if pid == 0:
            status = 1
            try:
                self._forget_in_child(None, ours)
                status = self._try_building(theirs)
            finally:
                daemon.exit_now(status)
        theirs.close()
        try:
            pidfd = daemon.watch_child(pid)
        except OSError as error:
            ours.close()
            self._reload_done(False, f"reload failed: cannot try the new tree: {error.strerror}")
            return
        timeout = self.limits.start_timeout
        self.trial = _Trial(pid, pidfd, ours, time.monotonic() + timeout if timeout else 0.0)
        self.selector.register(pidfd, selectors.EVENT_READ, self._trial_ended)

    def _try_building(self, channel: Channel) -> int:
        """In the trial child: build the new tree; say ERROR= with the line, or READY=1."""
        assert self.source is not None
        try:
            self.source.rebuild()
        except TendError as error:
            channel.send(ERROR=str(error))
            return 1
        except (Exception, SystemExit) as error:
            log.exception("building the tree again failed")
            channel.send(ERROR=f"{describe_error(error)} (the traceback is in the log)")
            return 1
        finally:
            self.sink.flush()
        channel.send(READY=1)
        return 0

    def _trial_ended(self) -> None:
        """The trial child exited: build here if it built, else the reload fails."""
        trial = self._end_trial()
        message = trial.channel.receive() if not trial.channel.closed else None
        trial.channel.close()
        if message is not None and message.error is not None:
            self._reload_done(False, f"reload failed: {message.error}")
        elif message is None or not message.ready:
            self._reload_done(False, "reload failed: the new tree's trial build ended early")
        elif self.stop_signal is None:
            self._build_incoming()

    def _end_trial(self, *, kill: bool = False) -> _Trial:
        """Forget the trial (killing it first with *kill*), reaped."""
        trial = self.trial
        assert trial is not None
        self.trial = None
        if kill:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(trial.pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(trial.pid, 0)  # it has exited, or was just killed
        self._forget_fd(trial.pidfd)
        return trial

    def _build_incoming(self) -> None:
        """The tree built in the trial: build it here too, and start its generation."""
        assert self.source is not None
        try:
            application = self.source.rebuild()
            self._watch_new_files()
            generation = self._make_generation(application)
        except TendError as error:
            self._reload_done(False, f"reload failed: {error}")
            return
        except (Exception, SystemExit) as error:  # whatever the new code does, tend serves on
            log.exception("building the tree again failed")
            self._reload_done(
                False, f"reload failed: {describe_error(error)} (the traceback is in the log)"
            )
            return
        self.incoming = generation

    def _refused(self, action: str, why: str, reply: Reply | None, unable: str | None) -> bool:
        """Whether *action* (reload, upgrade) cannot happen now; if so, say why, once."""
        reason = unable
        if self.stop_signal is not None:
            reason = "tend is stopping"
        elif self.reloading or self.successor is not None:
            reason = "a reload or an upgrade is already under way"
        elif not self.core.reported_ready:
            reason = "tend is still starting"
        if reason is None:
            return False
        log.warning("%s, but cannot %s: %s", why, action, reason)
        if reply is not None:
            reply(False, f"cannot {action}: {reason}")
        return True

    def upgrade(self, why: str, reply: Reply | None = None) -> None:
        """Run the tend program anew on the same sockets; see tend.upgrade.

        *reply(ok, line)* is called once the successor serves, or has failed.
        """
        unable = "the tend program is outside the --chroot jail" if self.chrooted else None
        if self.stop_signal is None and self.core.failure is None and unable is None:
            if self.reloading:
                log.info("%s during a reload: the upgrade follows it.", why)
                self.upgrade_held = _Asked.again(self.upgrade_held, why, reply)
                return
            if not self.ready:
                log.info("%s while tend is starting: it upgrades once ready.", why)
                self.upgrade_held = _Asked.again(self.upgrade_held, why, reply)
                return
        if self._refused("upgrade", why, reply, unable):
            return
        assert self.current is not None
        assert self.selector is not None
        from tend.upgrade import start_successor

        log.info("%s, upgrading: starting the tend program anew on the same sockets.", why)
        self.sink.flush()
        try:
            self.successor = start_successor(
                [
                    (
                        endpoint_key(listening.endpoint),
                        [[s.fileno() for s in c] for c in listening.copies],
                    )
                    for listening in self.current.listenings
                ],
                self.first_cwd,
                self.signals,
            )
        except OSError as error:
            line = f"upgrade failed: cannot start the tend program: {error.strerror or error}"
            log.error("%s", line)
            if reply is not None:
                reply(False, line)
            return
        if reply is not None:
            self.upgrade_replies.append(reply)
        self.successor_deadline = time.monotonic() + self.limits.start_timeout + START_GRACE
        successor = self.successor
        successor.channel.set_blocking(False)
        self.selector.register(
            successor.channel.fileno(), selectors.EVENT_READ, self._hear_successor
        )
        self.selector.register(successor.pidfd, selectors.EVENT_READ, self._successor_gone)

    def _hear_successor(self) -> None:
        successor = self.successor
        assert successor is not None
        while True:
            try:
                message = successor.channel.receive()
            except BlockingIOError:
                return
            if message is None:
                self._unregister(successor.channel.fileno())
                successor.channel.close()
                return
            if message.error is not None and successor.error is None:
                successor.error = message.error
            if message.ready:
                self._upgraded(successor)
                return

    def _successor_gone(self) -> None:
        successor = self.successor
        assert successor is not None
        try:
            _, wait_status = os.waitpid(successor.pid, 0)
            how = describe_exit(os.waitstatus_to_exitcode(wait_status))
        except ChildProcessError:
            how = "an unknown status"
        if not successor.channel.closed:
            self._hear_successor()
        if self.successor is None:  # it said READY just before it went
            return
        reason = successor.error or f"the new tend program exited with {how} before it was ready"
        self._upgrade_failed(reason)

    def _upgrade_failed(self, reason: str) -> None:
        successor = self.successor
        assert successor is not None
        self.successor = None
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(successor.pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(successor.pid, 0)
        self._unregister(successor.channel.fileno())
        self._forget_fd(successor.pidfd)
        successor.channel.close()
        self._take_back_files()
        line = f"upgrade failed: {reason}"
        log.error("%s; serving on as before", line)
        replies, self.upgrade_replies = self.upgrade_replies, []
        for reply in replies:
            reply(False, line)

    def _take_back_files(self) -> None:
        """After a failed upgrade: the pidfile and the control socket are this process's
        again. The successor may have renamed its own over them, and removed them as it
        failed; the new ones are renamed over whatever is there before the old ones are
        let go (which removes nothing that is not their own), so the paths never name
        nothing while this tend serves."""
        if self.pidfile is None:
            return
        old = self.pidfile
        pidfile = Pidfile(old.path)
        try:
            pidfile.acquire(take_over=True)
        except TendError as error:
            log.error("cannot write the pidfile again after the failed upgrade: %s", error)
        else:
            self.pidfile = pidfile
            old.release()
        if self.control is None:
            return
        try:
            control = ControlServer(self.control.path, take_over=True)
        except (TendError, OSError) as error:
            log.warning("cannot take the control socket back after the failed upgrade: %s", error)
            return
        self._unregister(self.control.fileno())
        control.connections.update(self.control.connections)  # tendctl waiting: kept
        self.control.listening.close()
        self.control = control
        if self.selector is not None:
            self.selector.register(control.fileno(), selectors.EVENT_READ, self._accept)

    def _upgraded(self, successor: Successor) -> None:
        """The successor serves: tell whoever waits, then drain and go, leaving it all to it."""
        self.successor = None
        self._unregister(successor.channel.fileno())
        self._unregister(successor.pidfd)
        # Its exit is now init's to reap: this process goes first.
        os.close(successor.pidfd)
        successor.channel.close()
        self.handed_over = True
        self.sink.leave_the_file()  # the successor rotates it from now on
        line = f"upgraded: pid {successor.pid} serves now"
        log.info("%s; this one (pid %d) drains and exits", line, os.getpid())
        self.upstream.handed_over(successor.pid)
        replies, self.upgrade_replies = self.upgrade_replies, []
        for reply in replies:
            reply(True, line)
        self.stop("SIGTERM", "Upgraded")

    def watch_files(self) -> None:
        """``--reload``: look at the tree's files every second; reload when one changes."""
        assert self.source is not None
        self.watched = _stamps(self.source.watched_files())
        self.next_look = time.monotonic() + WATCH_INTERVAL
        log.info("Watching %d file(s) to reload when one changes.", len(self.watched))

    def _look_at_files(self) -> None:
        assert self.source is not None
        assert self.watched is not None
        self.next_look = time.monotonic() + WATCH_INTERVAL
        if not self.can_begin:
            return  # a change meanwhile is seen once tend can reload again
        now = _stamps(self.watched)
        changed = [path for path, stamp in now.items() if stamp != self.watched[path]]
        self.watched = now
        if changed:
            shown = ", ".join(quote(path) for path in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            self.reload(f"Changed: {shown}{more}")

    def _promote(self) -> None:
        """The incoming generation is ready: it serves; the old one drains and goes."""
        assert self.incoming is not None
        assert self.current is not None
        old, self.current, self.incoming = self.current, self.incoming, None
        self.application = self.current.application
        old.core.status_counts = False
        if old.core.stop():
            self._signal_workers(signal.SIGTERM, old)
        self.retiring.append(old)
        self._close_unused()
        self._reload_done(True, f"reloaded: generation {self.current.number} {self.status_line}")

    def _watch_new_files(self) -> None:
        """Watch the files of the tree as built now, besides those of before: a module that
        failed to import is in neither sys.modules nor the new list, and its fix must count.
        A file already watched keeps the stamp it had when this reload began, and a new
        one is stamped as soon as the tree is built, before its workers start: a change
        made while they start is still a change, seen at the next look."""
        if self.watched is not None and self.source is not None:
            self.watched = {**_stamps(self.source.watched_files()), **self.watched}

    def _reload_done(self, ok: bool, line: str) -> None:
        self._watch_new_files()  # also the files of a tree that failed to build
        if ok:
            log.info("%s", line)
        else:
            log.error("%s", line)
        self.upstream.ready(self.status_line)
        replies, self.reload_replies = self.reload_replies, []
        for reply in replies:
            reply(ok, line)

    def _drop_held(self, why: str | None) -> None:
        """Answer everyone waiting for a held reload or upgrade: it will not happen, *why*
        (by default: tend stopped first)."""
        reload_held, upgrade_held = self.reload_held, self.upgrade_held
        self.reload_held = self.upgrade_held = None
        if reload_held is not None:
            reload_held.reply_to_all(False, why or "tend stopped before the reload was done")
        if upgrade_held is not None:
            upgrade_held.reply_to_all(False, why or "tend stopped before the upgrade was done")

    def _begin_held(self) -> None:
        """Begin the reload or upgrade held until tend could: ready, nothing under way."""
        if not self.can_begin:
            return
        if self.reload_held is not None:
            held, self.reload_held = self.reload_held, None
            self.reload(held.why, held.reply_to_all)
        elif self.upgrade_held is not None:
            held, self.upgrade_held = self.upgrade_held, None
            self.upgrade(held.why, held.reply_to_all)

    def _close_unused(self) -> None:
        """Close the sockets no live generation listens on (its workers keep their own)."""
        used = {id(listening) for g in self._live() for listening in g.listenings}
        for listening in self.listenings:
            if id(listening) not in used:
                listening.close()
        self.listenings = [listening for listening in self.listenings if id(listening) in used]

    def _signal_workers(self, signal_number: int, generation: Generation | None = None) -> None:
        for worker in list(self.workers.values()):
            if generation is None or worker.generation is generation:
                self._send_signal(worker, signal_number)

    def _send_signal(self, worker: _Worker, signal_number: int) -> None:
        """Signal *worker*, or, where the kernel refuses, ask it on its channel to stop.

        A supervisor without CAP_KILL (a systemd unit's capability set) may not signal a
        worker running as another user: then STOP=1 on the channel does what SIGTERM
        would. Nothing can stand in for SIGKILL: a worker that ignores its channel as well
        is left to the service manager.
        """
        try:
            signal.pidfd_send_signal(worker.pidfd, signal_number)
        except ProcessLookupError:
            return
        except PermissionError as error:
            if not worker.unsignalable:
                worker.unsignalable = True
                log.error(
                    "cannot signal worker %d (pid %d): %s; asking it to stop on its channel "
                    "instead (signalling workers that run as another user needs CAP_KILL)",
                    worker.number,
                    worker.pid,
                    error.strerror,
                )
            worker.channel.send(STOP=1)

    def _ping_interval(self) -> float | None:
        """How often workers say they are alive: for systemd's watchdog and our own."""
        notifier = self.upstream.notifier
        intervals = [
            interval
            for interval in (
                notifier.watchdog_interval() if notifier is not None else None,
                self.limits.ping_interval,
            )
            if interval is not None
        ]
        return min(intervals, default=None)

    # -- workers -------------------------------------------------------------------------

    def _spawn(self, generation: Generation, number: int) -> None:
        assert self.selector is not None
        for listening in generation.listenings:
            try:
                listening.reopen_copy(number - 1)
            except ListenError as error:
                log.error("worker %d will not accept on %s: %s", number, listening, error)
        try:
            ours, theirs = Channel.pair()
        except OSError as error:
            self._could_not_start(generation, number, error)
            return
        try:
            log_read, log_write = os.pipe2(os.O_CLOEXEC) if self.relay_logs else (None, None)
        except OSError as error:
            ours.close()
            theirs.close()
            self._could_not_start(generation, number, error)
            return
        plan = WorkerPlan(
            number=number,
            application=generation.application,
            identity=self.identity,
            loop_factory=self.loop_factory,
            limits=self.limits,
            ping_interval=self._ping_interval(),
            max_connections=self.max_connections,
        )
        self.sink.flush()
        try:
            with self.signals.forking():
                pid = daemon.fork()
                if pid == 0:  # the worker: it must never return into the supervisor's code
                    try:
                        worker_signals = self.signals.renew(WORKER_CATCHES, ignore=WORKER_IGNORES)
                    except BaseException:
                        daemon.exit_now(1)
        except OSError as error:  # EAGAIN: a pids cgroup or RLIMIT_NPROC at its limit
            for fd in (log_read, log_write):
                if fd is not None:
                    os.close(fd)
            ours.close()
            theirs.close()
            self._could_not_start(generation, number, error)
            return
        if pid == 0:
            status = 1
            try:
                self._forget_in_child(generation, ours, log_read)
                status = run_worker(plan, theirs, log_write, worker_signals, self.sink)
            finally:
                daemon.exit_now(status)
        theirs.close()
        if log_write is not None:
            os.close(log_write)
        try:
            pidfd = daemon.watch_child(pid)
        except OSError as error:  # out of descriptors: a worker it cannot watch is gone
            if log_read is not None:
                os.close(log_read)
            ours.close()
            self._could_not_start(generation, number, error)
            return
        worker = _Worker(generation, number, pid, pidfd, ours, log_read)
        self.workers[pid] = worker
        generation.workers[pid] = worker
        generation.core.started(number, pid)
        ours.set_blocking(False)
        for fd in (ours.fileno(), log_read, pidfd):
            if fd is not None:
                os.set_blocking(fd, False)
                self.selector.register(fd, selectors.EVENT_READ, worker)
        label = f" as {self.identity}" if self.identity.changes_anything else ""
        if generation.number > 1:
            label += f", generation {generation.number}"
        log.info("started worker %d (pid %d)%s", number, pid, label)

    def _could_not_start(self, generation: Generation, number: int, error: OSError) -> None:
        reason = error.strerror or str(error)
        delay = generation.core.could_not_start(number, reason)
        if delay is not None:
            log.error("cannot start worker %d: %s; trying again in %.1f s", number, reason, delay)

    def _forget_in_child(self, generation: Generation | None, *fds: Channel | int | None) -> None:
        """In a fresh worker (of *generation*) or trial build (None): close what is the
        supervisor's alone.

        The worker stays in the supervisor's process group, so a terminal lets it write
        (a background group would be stopped by SIGTTOU under `stty tostop`); the signals
        a terminal sends to the group are the supervisor's to act on (WORKER_IGNORES).
        """
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
        if self.control is not None:
            self.control.forget()
        if self.successor is not None:  # an upgrade under way: the new program's, not ours
            self.successor.channel.close()
            with contextlib.suppress(OSError):
                os.close(self.successor.pidfd)
        if self.trial is not None:  # a reload's trial build, under way
            self.trial.channel.close()
            with contextlib.suppress(OSError):
                os.close(self.trial.pidfd)
        self.upstream.forget()
        # Sockets only another generation listens on: this worker must not keep them open.
        mine = set() if generation is None else {id(x) for x in generation.listenings}
        for listening in self.listenings:
            if id(listening) not in mine:
                listening.forget()

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
            worker.generation.core.said(worker.pid, message)
            if message.watchdog:
                worker.connections = _number(message.get("CONNECTIONS"), worker.connections)
                worker.served = _number(message.get("SERVED"), worker.served)

    def _read_log(self, worker: _Worker) -> None:
        """Take the records the worker's pipe holds now, up to a MiB: a worker flooding
        its log must not starve the rest of the loop (the next turn takes more)."""
        assert worker.log_pipe is not None
        for _ in range(16):
            try:
                data = os.read(worker.log_pipe, 65536)
            except BlockingIOError:
                break
            if not data:
                self._flush_partial(worker)
                self._forget_fd(worker.log_pipe)
                worker.log_pipe = None
                return
            self._take_log(worker, data)

    def _take_log(self, worker: _Worker, data: bytes) -> None:
        """Write the records *data* completes; hold the start of the next one.

        A record has at most LONGEST_RELAYED_RECORD bytes: past that, what came is written
        with a mark and the rest dropped, so a worker (running code that an attacker may
        have taken over) cannot grow the root supervisor's memory, or one line, at will.
        """
        if worker.skipping_log:
            end = data.find(RECORD_END)
            if end < 0:
                return
            data = data[end + 1 :]
            worker.skipping_log = False
        complete, _, worker.pending_log = (worker.pending_log + data).rpartition(RECORD_END)
        if complete:
            self.sink.write_lines(complete.decode(errors="replace").split(RECORD_END.decode()))
        if len(worker.pending_log) > LONGEST_RELAYED_RECORD:
            cut = worker.pending_log[:LONGEST_RELAYED_RECORD].decode(errors="replace")
            self.sink.write_lines([f"{cut} [cut: a record over {LONGEST_RELAYED_RECORD} bytes]"])
            worker.pending_log = b""
            worker.skipping_log = True

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
            code = os.waitstatus_to_exitcode(wait_status)
        except ChildProcessError:  # user code reaped it (SIGCHLD ignored, say): not clean
            code = UNKNOWN_EXIT
        # Take what the worker said in its last moments before forgetting its pipes.
        if worker.log_pipe is not None:
            with contextlib.suppress(OSError):
                while data := os.read(worker.log_pipe, 65536):
                    self._take_log(worker, data)
            self._flush_partial(worker)
            self._forget_fd(worker.log_pipe)
        if not worker.channel.closed:
            self._read_messages(worker)
            self._unregister(worker.channel.fileno())
            worker.channel.close()
        self._forget_fd(worker.pidfd)
        del self.workers[worker.pid]
        generation = worker.generation
        del generation.workers[worker.pid]
        exit_ = generation.core.exited(worker.pid, code)
        if exit_ is not None:
            log.warning(
                "worker %d (pid %d) exited with %s%s; starting a new one in %.1f s",
                exit_.number,
                exit_.pid,
                exit_.how,
                "" if exit_.error is None else f" ({exit_.error})",
                exit_.restart_in,
            )
            if exit_.restart_in >= COPY_KEPT_FOR and self.incoming is None and not self.retiring:
                # Clients the kernel would queue on the dead worker's own socket would wait
                # the whole pause: close it, and bind it again for the next worker. (Not
                # while another generation's worker accepts on the same copy.)
                for listening in generation.listenings:
                    listening.close_copy(exit_.number - 1)

    # -- after -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the listeners (removing socket files bound here) and release the pidfile.

        After an upgrade the socket files are the successor's, and stay.
        """
        if self.successor is not None:
            self._upgrade_failed("tend stopped first")
        if self.control is not None:
            self.control.close()
            self.control = None
        for listening in self.listenings:
            if self.handed_over:
                listening.forget()
            else:
                listening.close()
        for server in listeners(self.application):
            if server.listening is not None:
                server.listening.close()
        if self.pidfile is not None:
            self.pidfile.release()
            self.pidfile = None


# How often --reload looks at the files' modification times.
WATCH_INTERVAL = 1.0


def _is_ready(worker: _Worker) -> bool:
    """Whether *worker* has said READY (a replacement or a reload's worker may not yet)."""
    record = worker.generation.core.workers.get(worker.pid)
    return record is not None and record.ready


def _stamps(paths: Iterable[str]) -> dict[str, tuple[int, int, int]]:
    """Each path's modification time, size and inode: a write within one tick of the
    clock still changes the size, and a file replaced by rename changes its inode. A
    missing file's stamp is all zeros (gone is a change)."""
    found = {}
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:
            found[path] = (0, 0, 0)
        else:
            found[path] = (status.st_mtime_ns, status.st_size, status.st_ino)
    return found


def _number(text: str | None, otherwise: int) -> int:
    return int(text) if text is not None and text.isascii() and text.isdigit() else otherwise
