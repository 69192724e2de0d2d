"""The lifecycle of one run, top to bottom, and which process plays which part.

::

    tend command        settings -> run(settings, build_tree)
      catch signals (flags only) -> check the event loop -> umask -> refuse a live pidfile
      -> open the log -> build the tree -> resolve the user to run as -> take systemd's sockets
      -> [detach: the launcher waits for READY/ERROR, see launcher.py]
    supervisor          pidfile -> bind listeners, privileged starts -> chroot, rundir
      -> fork workers -> report ready (to the launcher, to systemd) -> supervise
      -> on SIGTERM/SIGINT pass the stop on -> remove the pidfile
    worker (each)       drop privileges -> serve loop: start, READY, wait, drain, stop

A stop signal at any point before ready ends the start cleanly: the phases check for
one between their steps, and nothing is left behind. This module raises TendError for
anything the user should read; it never prints.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from tend import __version__, daemon
from tend.errors import StartupError, TendError, UsageError
from tend.files import working_directory
from tend.launcher import Launcher, detach
from tend.logs import open_log
from tend.net import listeners
from tend.pidfile import PidfileLockedError, read_pidfile
from tend.privileges import check_can_switch, resolve_identity
from tend.serve import event_loop_factory
from tend.settings import Settings
from tend.signals import CAUGHT, STOP, Signals, abandoning_on_stop, name_of
from tend.sources import TreeSource
from tend.supervision import Limits
from tend.supervisor import Supervisor, Upstream
from tend.systemd import Notifier

log = logging.getLogger("tend")

# Set by a tend being upgraded for the program it starts (see tend.upgrade).
UPGRADE_CHANNEL = "TEND_UPGRADE_CHANNEL"


def run(settings: Settings, source: TreeSource, abandon: Callable[[str], NoReturn]) -> int:
    """Run the tree *source* builds until it is stopped; return the exit status.

    *abandon(line)* ends the process at once with that line for the user: for a stop
    signal while the tree is being built, by code that may never return, or a build that
    outlasts ``--start-timeout``. A reload builds the tree again from *source*.

    Raises:
        TendError: the start failed, with the line for the user.
    """
    daemon.fill_standard_streams()
    first_cwd = working_directory()
    # From here on a signal only sets a flag; each phase below checks between its steps.
    signals = Signals(catch=CAUGHT).install()
    handover = None
    if os.environ.get(UPGRADE_CHANNEL):
        from tend.upgrade import Handover

        # Started by a tend being upgraded: it holds the pidfile and waits for our READY.
        handover = Handover.from_environment()
    loop_factory = event_loop_factory(settings.loop)
    if settings.reload and not settings.nodaemon:
        raise UsageError("--reload is for development, in the foreground: add --nodaemon")
    if not settings.nodaemon and handover is None:
        if settings.log.logfile is None and not settings.log.syslog:
            raise StartupError(
                "cannot log to standard output when detached: it is /dev/null; "
                "give --logfile PATH or --nodaemon"
            )
        # Before the log file exists, so a detached daemon's log is private by default.
        daemon.set_umask(0o077 if settings.umask is None else settings.umask)
    elif settings.umask is not None:
        daemon.set_umask(settings.umask)
    if settings.pidfile and handover is None:
        # Refuse early, before writing to a log that the running server owns.
        state = read_pidfile(settings.pidfile)
        if state is not None and state.locked:
            raise PidfileLockedError(
                f"Another tend server is running, PID {state.pid} (pidfile {state.path})"
            )
    sink = open_log(settings.log)
    sink.install()
    # Read here, in the process systemd started: WATCHDOG_PID names this one.
    notifier = Notifier.from_environment() if os.environ.get("NOTIFY_SOCKET") else None
    upstream = Upstream(None if handover is None else handover.channel, notifier)
    upstream.started()
    supervisor: Supervisor | None = None
    in_launcher = False
    try:
        log.info(
            "tend %s (%s %s) starting up.", __version__, sys.executable, sys.version.split()[0]
        )

        def abandon_start(reason: str) -> None:
            log.error("tend: %s", reason)
            sink.flush()
            abandon(reason)

        with abandoning_on_stop(
            signals,
            abandon_start,
            settings.start_timeout,
            f"{source.description} did not finish loading within {settings.start_timeout:g} s "
            "(--start-timeout)",
        ):
            application = source.build()
        identity = resolve_identity(
            settings.uid if settings.uid is not None else application.uid,
            settings.gid if settings.gid is not None else application.gid,
        )
        check_can_switch(identity)
        # After an upgrade the passed sockets come with the handover (LISTEN_* are gone).
        if handover is None and any(
            server.endpoint.passed_by_systemd for server in listeners(application)
        ):
            from tend.systemd import inherited_sockets

            # Taken now: LISTEN_PID names this process, not the daemon it may fork.
            inherited_sockets()
        check_stop(signals)
        if not settings.nodaemon and handover is None:
            sink.flush()
            channel, signals, in_launcher = detach(signals)
            if in_launcher:
                return Launcher(channel, signals, notifier, sink.description).wait()
            upstream.launcher = channel
            upstream.started()
            daemon.redirect_standard_streams()
        sink.settle()
        supervisor = Supervisor(
            application,
            source=source,
            workers=settings.workers,
            identity=identity,
            sink=sink,
            upstream=upstream,
            signals=signals,
            loop_factory=loop_factory,
            limits=Limits(
                shutdown_timeout=settings.shutdown_timeout,
                start_timeout=settings.start_timeout,
                worker_timeout=settings.worker_timeout,
            ),
            handover=handover,
            first_cwd=first_cwd,
            chrooted=settings.chroot is not None,
            max_connections=settings.max_connections,
        )
        if settings.pidfile:
            supervisor.take_pidfile(settings.pidfile)
        check_stop(signals)
        supervisor.bind()
        if settings.chroot is not None or identity.changes_anything:
            daemon.preload_modules()
        daemon.enter_rundir(settings.rundir, settings.chroot)
        check_stop(signals)
        if settings.reload:
            supervisor.watch_files()
        return supervisor.run()
    except TendError as error:
        # The launcher's daemon has logged this already.
        if not in_launcher:
            log.error("tend: %s", error)
            error.already_said = sink.shares_stderr
        upstream.failed(str(error))
        raise
    except BaseException:
        if not in_launcher:
            log.exception("tend stopped on an unexpected error")
        raise
    finally:
        if supervisor is not None:
            supervisor.close()
            log.info("Server Shut Down.")
        sink.close()


def check_stop(signals: Signals) -> None:
    """Between start-up steps: end the start if a stop signal has come.

    Raises:
        StartupError: a stop signal came; the line names it.
    """
    for signal_number in signals.peek():
        if signal_number in STOP:
            raise StartupError(
                f"stopped by {name_of(signal_number)} before the services were ready"
            )
