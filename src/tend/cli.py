"""The ``tend`` command: parse the command line, pick the tree, hand it to the runner.

This is the only module that prints to the terminal or exits. Errors a user can fix are
one line on standard error (``tend: ...``): exit 2 for a command-line mistake, 1 for a
failed start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn

from tend.errors import StartupError, TendError, UsageError
from tend.options import PROG, runner_parser, workers_count

if TYPE_CHECKING:
    from tend.plugins import ServiceMaker
    from tend.runner import RunnerOptions
    from tend.service import Application


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the ``tend`` command and exit with its status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        status = run_command(arguments)
    except UsageError as error:
        _fail(str(error), 2)
    except TendError as error:
        _fail(str(error), 1)
    except KeyboardInterrupt:
        _fail("interrupted before the services were ready", 1)
    sys.exit(status)


def _fail(message: str, status: int) -> NoReturn:
    # stderr may already be /dev/null in a detached daemon; the log has the line anyway.
    with contextlib.suppress(OSError):
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def run_command(arguments: list[str]) -> int:
    """Parse *arguments*, build the chosen tree and run it; return the exit status."""
    parser = runner_parser()
    parsed = parser.parse_args(arguments)
    if parsed.python is None and parsed.config is None and parsed.plugin is None:
        print(parser.format_help())
        _list_plugins()
        return 0
    if parsed.plugin is not None and (parsed.python or parsed.config):
        source = "-y" if parsed.python else "-c"
        raise UsageError(
            f"give a plugin or {source}, not both: {parsed.plugin!r} was given with {source}"
        )
    settings: dict[str, object] = {}
    build: Callable[[], Application]
    if parsed.python is not None:
        build = _app_file_builder(parsed.python)
    elif parsed.config is not None:
        from tend.deploy import load_deployment

        deployment = load_deployment(os.path.abspath(parsed.config))
        settings = dict(deployment.settings)
        build = deployment.build
    else:
        build = _plugin_builder(parsed.plugin, parsed.plugin_arguments)
    options = runner_options(parsed, settings)

    from tend.runner import Runner

    return Runner(options, build).run()


def runner_options(parsed: argparse.Namespace, settings: Mapping[str, object]) -> RunnerOptions:
    """Merge the command line over a deployment file's settings, then the defaults.

    Relative paths typed on the command line are relative to where tend was started;
    relative paths in a deployment file were already made relative to its folder; the
    default pidfile and log file live in the rundir.
    """
    from tend.logs import LogConfig
    from tend.runner import RunnerOptions

    def pick(name: str, default: object = None) -> object:
        value = getattr(parsed, name)
        if value is not None:
            return value
        return settings.get(name, default)

    def path(name: str) -> str | None:
        value = pick(name)
        return None if value is None else os.path.abspath(str(value))

    nodaemon = bool(pick("nodaemon", False))
    chroot = path("chroot")
    if chroot is None:
        rundir = path("rundir") or os.getcwd()
        files_in = rundir
    else:
        # As twistd: the rundir is inside the new root (its top by default), while the
        # pidfile and log, opened before the chroot, default to where tend was started.
        rundir = str(pick("rundir") or "/")
        files_in = os.getcwd()
    pidfile_value = pick("pidfile")
    if pidfile_value is None:
        pidfile: str | None = os.path.join(files_in, "tend.pid")
    else:
        pidfile = os.path.abspath(str(pidfile_value)) if pidfile_value else None
    logfile_value = pick("logfile")
    if logfile_value is None:
        logfile: str | None = None if nodaemon else os.path.join(files_in, "tend.log")
    elif logfile_value == "-":
        logfile = None
    else:
        logfile = os.path.abspath(str(logfile_value))
    backups = pick("log_backups")
    log_config = LogConfig(
        logfile=logfile,
        syslog=bool(pick("syslog", False)),
        prefix=str(pick("prefix", "tend")),
        syslog_facility=str(pick("syslog_facility", "user")),
        syslog_address=str(pick("syslog_address", "/dev/log")),
        max_bytes=int(str(pick("log_max_bytes", 1_000_000))),
        backups=None if backups is None else int(str(backups)),
        format=str(pick("log_format", "text")),
    )
    umask = pick("umask")
    uid = pick("uid")
    gid = pick("gid")
    return RunnerOptions(
        nodaemon=nodaemon,
        pidfile=pidfile,
        log=log_config,
        uid=None if uid is None else str(uid),
        gid=None if gid is None else str(gid),
        umask=None if umask is None else int(str(umask)),
        rundir=rundir,
        chroot=chroot,
        loop=str(pick("loop", "auto")),
        shutdown_timeout=float(str(pick("shutdown_timeout", 10.0))),
        workers=workers_count(str(pick("workers", 1))),
    )


def _plugin_builder(name: str, arguments: list[str]) -> Callable[[], Application]:
    from tend.plugins import find_plugin

    maker = find_plugin(name)
    options = maker.parse_options(arguments, prog=f"{PROG} {name}")
    return lambda: make_application(maker, options, name)


def make_application(maker: ServiceMaker, options: Mapping[str, object], name: str) -> Application:
    """Wrap the plugin's service in an Application, as twistd does for a plugin."""
    import logging

    from tend.service import Application

    try:
        service = maker.make_service(options)
    except TendError:
        raise
    except Exception as error:
        logging.getLogger("tend").exception("plugin %r failed to make its service", name)
        raise StartupError(
            f"plugin {name!r} failed to make its service: {type(error).__name__}: {error} "
            "(the traceback is in the log)"
        ) from None
    application = Application(name)
    service.set_service_parent(application)
    return application


def _app_file_builder(path: str) -> Callable[[], Application]:
    def build() -> Application:
        from tend.appfile import load_application

        return load_application(path)

    return build


def _list_plugins() -> None:
    from tend.plugins import find_plugins

    index = find_plugins()
    print("Plugins:")
    width = max((len(name) for name in index.makers), default=0) + 2
    for name in sorted(index.makers):
        print(f"  {name.ljust(width)}{index.makers[name].description}")
    if not index.makers:
        print("  (none found)")
    for failure in index.failures:
        print(f"{PROG}: a plugin failed to load: {failure}", file=sys.stderr)
