"""The lifecycle of one run, from open logs to the last line of the shutdown narrative.

open logs -> build the tree -> detach -> pidfile -> privileged start -> chroot, rundir
-> [fork workers under a supervisor, which drop privileges] -> start -> report ready
-> wait for a signal -> stop (bounded) -> remove pidfile.

This is the only module that installs signal handlers and runs an event loop. It raises
TendError for anything the user should read; it never prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from tend import __version__, daemon
from tend.endpoints import SystemdEndpoint
from tend.errors import StartupError, TendError
from tend.logs import LogError, LogSink, open_log
from tend.net import StreamServer, factory_name
from tend.service import Application, Service, walk
from tend.settings import LOOPS, Settings
from tend.supervisor import Supervisor, WorkerFailedError

if TYPE_CHECKING:
    from tend.systemd import Notifier

log = logging.getLogger("tend")

# How long stop_service may overrun the drain deadline before tend gives up on it.
STOP_OVERRUN = 5.0


BuildTree = Callable[[], Application]


class Runner:
    """Runs one service tree through the lifecycle, as twistd's ApplicationRunner does."""

    def __init__(self, options: Settings, build_tree: BuildTree) -> None:
        self.options = options
        self.build_tree = build_tree
        self.sink: LogSink | None = None
        self.pidfile: daemon.Pidfile | None = None
        self._ready_pipe: int | None = None  # the daemon's end: tells the launcher
        self._launcher_pipe: int | None = None  # the launcher's end
        self._control: int | None = None  # in a worker: READY/ERROR/WATCHDOG to the supervisor
        self.notifier: Notifier | None = None  # systemd's NOTIFY_SOCKET, if set
        self._status = ""  # what this run serves, for STATUS=
        self._stop_requested: asyncio.Event | None = None
        self._second_signal: asyncio.Event | None = None  # set by a signal during the stop
        self._signals: list[str] = []

    # -- the whole run -------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the exit status. Raises TendError before ready."""
        options = self.options
        loop_factory = _loop_factory(options.loop)
        # Until the event loop takes over, a stop signal ends the start cleanly: the pidfile
        # and socket files go, and the user reads one line instead of a dead process.
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signal_number, _stopped_while_starting)
        # A logrotate that signals early must not kill the server (SIGUSR1's default).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if not options.nodaemon:
            if options.log.logfile in (None, "-") and not options.log.syslog:
                raise StartupError(
                    "cannot log to standard output when detached: it is /dev/null; "
                    "give --logfile PATH or --nodaemon"
                )
            # Before the log file exists, so a detached daemon's log is private by default.
            os.umask(0o077 if options.umask is None else options.umask)
        elif options.umask is not None:
            os.umask(options.umask)
        if options.pidfile:
            # Refuse early, before writing to a log that the running server owns.
            state = daemon.read_pidfile(options.pidfile)
            if state is not None and state.locked:
                raise daemon.PidfileLockedError(
                    f"Another tend server is running, PID {state.pid} (pidfile {state.path})"
                )
        self.sink = open_log(options.log)
        self.sink.install()
        if os.environ.get("NOTIFY_SOCKET"):
            from tend.systemd import Notifier

            # Read here, in the process systemd started: WATCHDOG_PID names this one.
            self.notifier = Notifier.from_environment()
        try:
            log.info(
                "tend %s (%s %s) starting up.",
                __version__,
                sys.executable,
                sys.version.split()[0],
            )
            application = self.build_tree()
            identity = daemon.resolve_identity(
                options.uid if options.uid is not None else application.uid,
                options.gid if options.gid is not None else application.gid,
            )
            daemon.check_can_switch(identity)
            if _uses_socket_activation(application):
                from tend.systemd import inherited_sockets

                # Taken now: LISTEN_PID names this process, not the daemon it may fork.
                inherited_sockets()
            if not options.nodaemon and self._detach():
                return self._wait_for_daemon()
            return self._run_here(application, identity, loop_factory)
        except TendError as error:
            # The launcher's daemon, or the failing worker, has logged this already.
            if self._launcher_pipe is None and not isinstance(error, WorkerFailedError):
                log.error("tend: %s", error)
            self._report_failure(str(error))
            raise
        except BaseException:
            if self._launcher_pipe is None:
                log.exception("tend stopped on an unexpected error")
            raise
        finally:
            if self.pidfile is not None:
                self.pidfile.release()
            self.sink.close()

    def _detach(self) -> bool:
        """Fork the daemon; True in the launcher, which waits to hear that it is ready."""
        assert self.sink is not None
        self.sink.flush()
        read_end, write_end = os.pipe()
        if daemon.detach() is not None:
            os.close(write_end)
            self._launcher_pipe = read_end
            return True
        os.close(read_end)
        self._ready_pipe = write_end
        return False

    def _wait_for_daemon(self) -> int:
        """In the launcher: return 0 once the daemon is ready, or raise what it reported."""
        assert self._launcher_pipe is not None
        # READY comes alone; after ERROR, read on to end-of-file, which comes when the
        # daemon has exited, so that nothing of it is left when the launcher returns.
        chunks = []
        while chunk := os.read(self._launcher_pipe, 4096):
            chunks.append(chunk)
            if b"".join(chunks).startswith(b"READY") and chunk.endswith(b"\n"):
                break
        os.close(self._launcher_pipe)
        report = b"".join(chunks).decode(errors="replace").strip()
        if report.startswith("READY"):
            if self.notifier is not None:
                # systemd hears from its main process only (NotifyAccess=main): the
                # launcher names the daemon as the new main process as it reports ready.
                _, pid, status = [*report.split(" ", 2), ""][:3]
                self.notifier.ready(status or "running", mainpid=int(pid))
            return 0
        if report.startswith("ERROR "):
            raise StartupError(report.removeprefix("ERROR "))
        where = self.sink.description if self.sink is not None else "the log"
        raise StartupError(f"the daemon exited before it was ready; see {where}")

    def _run_here(
        self,
        application: Application,
        identity: daemon.Identity,
        loop_factory: Callable[[], asyncio.AbstractEventLoop],
    ) -> int:
        options = self.options
        if not options.nodaemon:
            daemon.redirect_standard_streams()
        if options.pidfile:
            self.pidfile = daemon.Pidfile(options.pidfile)
            self.pidfile.acquire()
        if options.workers > 1:
            for server in listeners(application):
                server.listen_copies = options.workers
        with _starting(application):  # whatever fails from here closes what was bound
            application.privileged_start_service()
            if options.chroot is not None or identity.changes_anything:
                daemon.preload_modules()
            daemon.enter_rundir(options.rundir, options.chroot)
        self._status = describe_serving(application)
        if identity.changes_anything or options.workers > 1:
            status = self._supervise(application, identity, loop_factory)
        else:
            status = self._run_loop(application, loop_factory)
        log.info("Server Shut Down.")
        return status

    def _run_loop(
        self, application: Application, loop_factory: Callable[[], asyncio.AbstractEventLoop]
    ) -> int:
        with asyncio.Runner(loop_factory=loop_factory) as loop_runner:
            return loop_runner.run(self._serve(application))

    def _supervise(
        self,
        application: Application,
        identity: daemon.Identity,
        loop_factory: Callable[[], asyncio.AbstractEventLoop],
    ) -> int:
        """Keep this process as the supervisor; run the tree in forked workers."""
        sink = self.sink
        assert sink is not None

        supervisor_pid = os.getpid()

        def worker_main(number: int, control: int, log_pipe: int | None) -> int:
            # In the forked worker: the supervisor keeps the pidfile and the launcher.
            if self.pidfile is not None:
                self.pidfile.forget()
                self.pidfile = None
            if self._ready_pipe is not None:
                os.close(self._ready_pipe)
            self._ready_pipe = None
            self._control = control
            if log_pipe is not None:
                sink.relay_to(log_pipe)
            for server in listeners(application):
                server.use_copy(number - 1)
            try:
                daemon.drop_privileges(identity)
                daemon.die_with_parent(signal.SIGTERM, supervisor_pid)
                return self._run_loop(application, loop_factory)
            except TendError as error:
                log.error("tend: %s", error)
                self._report_failure(str(error))
            except BaseException as error:
                log.exception("worker %d stopped on an unexpected error", number)
                self._report_failure(f"worker {number} failed: {type(error).__name__}: {error}")
            finally:
                sink.close()
            return 1

        supervisor = Supervisor(
            self.options.workers,
            worker_main,
            relay_logs=sink.fileno() is not None,
            write_log_lines=sink.write_lines,
            reopen_log=lambda: reopen_log(sink),
            flush_log=sink.flush,
            shutdown_timeout=self.options.shutdown_timeout,
            on_ready=self._report_ready,
            # The workers log their listeners' closing; the supervisor's copies go quietly.
            on_stopping=lambda: self._on_stopping(application, quietly=True),
            on_watchdog=self.notifier.watchdog if self.notifier is not None else None,
            identity_label=f" as {identity}" if identity.changes_anything else "",
        )
        try:
            return supervisor.run()
        finally:
            _close_listeners(application)

    # -- inside the event loop -----------------------------------------------------------

    async def _serve(self, application: Application) -> int:
        loop = asyncio.get_running_loop()
        log.info("event loop class: %s.", _qualified_name(type(loop)))
        self._stop_requested = asyncio.Event()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, self._on_stop_signal, signal_number)
        loop.add_signal_handler(signal.SIGUSR1, self._on_reopen_signal)
        watchdog = None
        try:
            await self._start_unless_stopped(application)
            self._report_ready()
            interval = self.notifier.watchdog_interval() if self.notifier is not None else None
            if interval is not None:
                watchdog = asyncio.create_task(self._ping_watchdog(interval))
            await self._stop_requested.wait()
            return await self._stop(application)
        finally:
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
            for signal_number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.remove_signal_handler(signal_number)
            log.info("Main loop terminated.")

    async def _ping_watchdog(self, interval: float) -> None:
        """Say "still alive" every *interval* seconds, from the loop itself.

        Sent from a task on the event loop, so a loop blocked by a runaway callback stops
        the pings and systemd restarts the service. A worker tells its supervisor, which
        pings systemd once every worker has.
        """
        while True:
            if self._control is not None:
                _write_line(self._control, "WATCHDOG")
            elif self.notifier is not None:
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _start_unless_stopped(self, application: Application) -> None:
        """Start the tree; a stop signal meanwhile cancels the start instead of waiting."""
        assert self._stop_requested is not None
        starting = asyncio.create_task(self._start(application))
        stopped = asyncio.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopped
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            _close_listeners(application)
            raise StartupError(f"stopped by {self._signals[0]} before the services were ready")
        starting.result()

    async def _start(self, application: Application) -> None:
        with _starting(application):
            await application.start_service()

    def _on_stop_signal(self, signal_number: int) -> None:
        # A handler only records and wakes; the main coroutine does the work.
        assert self._stop_requested is not None
        self._signals.append(signal.Signals(signal_number).name)
        self._stop_requested.set()
        if len(self._signals) > 1 and self._second_signal is not None:
            self._second_signal.set()

    def _on_reopen_signal(self) -> None:
        log.info("Received SIGUSR1, reopening the log.")
        if self.sink is not None:
            reopen_log(self.sink)

    async def _stop(self, application: Application) -> int:
        loop = asyncio.get_running_loop()
        log.info("Received %s, shutting down.", self._signals[0])
        if self._control is None:
            self._on_stopping(application, quietly=False)
        self._second_signal = asyncio.Event()
        if len(self._signals) > 1:
            self._second_signal.set()
        servers = listeners(application)
        deadline = loop.time() + self.options.shutdown_timeout
        for server in servers:  # their listeners closed in _on_stopping
            server.drain_deadline = deadline
        stopping = asyncio.create_task(application.stop_service())
        second = asyncio.create_task(self._second_signal.wait())
        done, _ = await asyncio.wait(
            {stopping, second},
            timeout=self.options.shutdown_timeout + STOP_OVERRUN,
            return_when=asyncio.FIRST_COMPLETED,
        )
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second
        status = 0
        if stopping not in done:
            if second in done:
                log.warning("Received %s again, stopping at once.", self._signals[-1])
            else:
                log.error(
                    "services did not stop within %.1f s; stopping at once.",
                    self.options.shutdown_timeout + STOP_OVERRUN,
                )
            stopping.cancel()
            with contextlib.suppress(BaseException):
                await stopping
            for server in servers:
                server.reset_all()
            return 1
        if (error := stopping.exception()) is not None:
            log.error("error while stopping the services", exc_info=error)
            status = 1
        if any(server.aborted_connections for server in servers):
            status = 1
        return status

    # -- telling whoever started us ------------------------------------------------------

    def _report_ready(self) -> None:
        # Whoever waits for ready may read the log next: the start lines must be there.
        if self.sink is not None:
            self.sink.flush()
        if self._control is not None:  # a worker: the supervisor reports for all of them
            _write_line(self._control, "READY")
            return
        if self._ready_pipe is not None:
            # The launcher is the process systemd started; it tells systemd (see below).
            _write_line(self._ready_pipe, f"READY {os.getpid()} {self._status}")
            with contextlib.suppress(OSError):
                os.close(self._ready_pipe)
            self._ready_pipe = None
        elif self.notifier is not None:
            self.notifier.ready(self._status)

    def _report_failure(self, message: str) -> None:
        # The pipe stays open until this process exits: its end-of-file tells the
        # launcher that the failed daemon is gone.
        for fd in (self._control, self._ready_pipe):
            if fd is not None:
                _write_line(fd, f"ERROR {message}")
        self._control = self._ready_pipe = None

    def _on_stopping(self, application: Application, *, quietly: bool) -> None:
        """The stop has begun: refuse new clients at once and tell systemd."""
        for server in listeners(application):
            if quietly:
                server.close_listeners()
            else:
                server.stop_listening()
        if self.notifier is not None:
            self.notifier.stopping("stopping")


def _write_line(fd: int, line: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, f"{line}\n".encode())


def describe_serving(application: Service) -> str:
    """One line naming what the tree listens on, for systemd's STATUS= and tendctl."""
    parts = [
        f"{factory_name(server.protocol_factory)} on {', '.join(server.addresses)}"
        for server in listeners(application)
        if server.addresses
    ]
    return "serving " + "; ".join(parts) if parts else "running"


def reopen_log(sink: LogSink) -> None:
    """Reopen the log file; if that fails, say so and keep the old one."""
    try:
        sink.reopen()
    except LogError as error:
        log.warning("cannot reopen the log: %s", error)


@contextlib.contextmanager
def _starting(application: Service) -> Iterator[None]:
    """Turn a failed start into one line for the user, the traceback into the log.

    A TendError already is that line. Either way the listeners bound so far are closed.
    """
    try:
        yield
    except TendError:
        _close_listeners(application)
        raise
    except Exception as error:
        log.exception("a service failed to start")
        _close_listeners(application)
        raise StartupError(
            f"a service failed to start: {type(error).__name__}: {error} "
            "(the traceback is in the log)"
        ) from None


def _stopped_while_starting(signal_number: int, frame: object) -> None:
    name = signal.Signals(signal_number).name
    raise StartupError(f"stopped by {name} before the services were ready")


def _uses_socket_activation(application: Service) -> bool:
    return any(isinstance(server.endpoint, SystemdEndpoint) for server in listeners(application))


def listeners(application: Service) -> list[StreamServer]:
    """Every listening service in the tree, in tree order."""
    return [service for service in walk(application) if isinstance(service, StreamServer)]


def _close_listeners(application: Service) -> None:
    for server in listeners(application):
        server.close_listeners()


def _qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop constructor for ``--loop NAME``; checked before anything starts.

    ``auto``, the default, takes uvloop when it is installed, as uvicorn does: it halves
    the CPU a connection costs (see the README's benchmark), and asyncio is there if not.
    """
    if name == "auto":
        try:
            return _loop_factory("uvloop")
        except StartupError:
            return asyncio.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise StartupError(
                "cannot use the uvloop event loop: uvloop is not installed; "
                "install it with: pip install 'tend[uvloop]'"
            ) from None
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    raise StartupError(f"unknown event loop {name!r}; expected one of {', '.join(LOOPS)}")
