"""The runner's settings: one table, from which the command line and ``[tend]`` are made.

Each row of `SETTINGS` is an option with its name, type, default and help; the ``tend``
command line gets them through argparse (flags with a ``--no-`` form), a deployment
file's ``[tend]`` table takes the same names with the same conversion, and `resolve`
turns what was given into the typed `Settings` a run follows. Of the system it asks only
how many CPUs there are (``--workers auto``); it prints nothing.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tend.errors import quote
from tend.options import Flag, Option, count, seconds, values_of

if TYPE_CHECKING:
    from tend.logs import LogConfig

LOOPS = ("auto", "asyncio", "uvloop")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


# logging.handlers.SysLogHandler.facility_names, written out: --help need not import it.
SYSLOG_FACILITIES = (
    "auth", "authpriv", "console", "cron", "daemon", "ftp", "kern", "local0", "local1",
    "local2", "local3", "local4", "local5", "local6", "local7", "lpr", "mail", "news", "ntp",
    "security", "solaris-cron", "syslog", "user", "uucp",
)  # fmt: skip

# More workers than this is a mistake (a typo of a port, say), not a machine.
MOST_WORKERS = 1024


def umask(text: str) -> int:
    """An octal file mode creation mask, 000 to 777, in ASCII digits (``022``, ``0077``)."""
    if not re.fullmatch(r"0?[0-7]{1,3}", text):
        raise argparse.ArgumentTypeError(
            f"invalid umask {quote(text)}: expected octal digits from 000 to 777, like 022"
        )
    return int(text, 8)


def pidfile_path(text: str) -> str:
    """A pidfile's path, or "" for none; "-" means standard output elsewhere, not here."""
    if text == "-":
        raise argparse.ArgumentTypeError("'-' is not a pidfile: give a path, or '' for none")
    return text


def console_socket(text: str) -> str:
    """A console's socket path (``--console``): a file path, never a port or an endpoint."""
    from tend.builtins.manhole import console_socket  # here: only a run with a console

    return console_socket(text)


def syslog_address(text: str) -> str:
    """A syslog socket path, or HOST:PORT for UDP, checked as the log will read it."""
    from tend.logs import LogError, parse_syslog_address  # here: --help need not import it

    try:
        parse_syslog_address(text)
    except LogError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def user_or_group(text: str) -> str:
    """A user or group: a name, or an id from 0 to 2**32 - 2 in ASCII digits."""
    if text.isdigit() or text.isdecimal() or text.isnumeric():
        if not text.isascii() or int(text) > 2**32 - 2:
            raise argparse.ArgumentTypeError(
                f"invalid id {quote(text)}: expected a name, or a number from 0 to {2**32 - 2}"
            )
    elif not text or not text.isprintable() or text.strip() != text or ":" in text:
        raise argparse.ArgumentTypeError(f"invalid name {quote(text)}: expected a name or an id")
    return text


def workers(text: str) -> int:
    """A number of worker processes, 1 or more, or ``auto`` for one per CPU."""
    if text == "auto":
        return min(os.cpu_count() or 1, MOST_WORKERS)
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MOST_WORKERS:
        raise argparse.ArgumentTypeError(
            f"invalid worker count {quote(text)}: expected 1 to {MOST_WORKERS}, or auto"
        )
    return int(text)


SETTINGS: tuple[Option | Flag, ...] = (
    Flag("nodaemon", "n", "stay in the foreground"),
    Option(
        "pidfile",
        help="pidfile to write (default: tend.pid in the rundir; '' for none)",
        type=pidfile_path,
        metavar="PATH",
        path=True,
    ),
    Option(
        "logfile",
        "l",
        help="log file; '-' is standard output "
        "(default: tend.log detached, standard output with --nodaemon)",
        metavar="PATH",
        path=True,
    ),
    Option(
        "log-max-bytes",
        default=1_000_000,
        help="rotate the log file before it passes N bytes; 0 never",
        type=count,
        metavar="N",
    ),
    Option(
        "log-backups",
        help="keep N rotated log files (default: all)",
        type=count,
        metavar="N",
    ),
    Option("log-format", default="text", help="log line format", choices=LOG_FORMATS),
    Option(
        "log-level",
        default="info",
        help="log records of this level and above",
        choices=LOG_LEVELS,
    ),
    Option(
        "console",
        help="open a Python console into the running tend on this UNIX socket, mode 0600 in "
        "a folder closed to others (PATH.N for worker N; see tend manhole)",
        type=console_socket,
        metavar="PATH",
        path=True,
    ),
    Flag("syslog", None, "log to syslog instead of a file"),
    Flag(
        "reload",
        None,
        "while developing, in the foreground: reload when a file of the tree's changes",
    ),
    Option("prefix", default="tend", help="syslog tag", metavar="TAG"),
    Option(
        "syslog-facility",
        default="user",
        help="syslog facility: daemon, local0 ... local7, ...",
        choices=SYSLOG_FACILITIES,
        metavar="NAME",
    ),
    Option(
        "syslog-address",
        default="/dev/log",
        help="syslog socket path or HOST:PORT",
        type=syslog_address,
        metavar="ADDRESS",
    ),
    Option("uid", "u", help="user name or id to run as", type=user_or_group, metavar="USER"),
    Option(
        "gid",
        "g",
        help="group name or id to run as (default: the user's group)",
        type=user_or_group,
        metavar="GROUP",
    ),
    Option(
        "umask",
        help="umask (default: 0077 detached, unchanged with --nodaemon)",
        type=umask,
        metavar="MODE",
        string_example='"022"',
    ),
    Option("rundir", "d", help="directory to run in (default: .)", metavar="DIR", path=True),
    Option("chroot", help="chroot to DIR before starting", metavar="DIR", path=True),
    Option(
        "loop",
        default="auto",
        help="event loop; auto is uvloop when installed, else asyncio",
        choices=LOOPS,
    ),
    Option(
        "shutdown-timeout",
        default="10",
        help="how long connections may finish after SIGTERM",
        type=seconds,
        metavar="SECONDS",
    ),
    Option(
        "start-timeout",
        default="60",
        help="how long the start may take, from loading the tree to every worker serving; "
        "0 for no limit",
        type=seconds,
        metavar="SECONDS",
    ),
    Option(
        "worker-timeout",
        default="30",
        help="kill and replace a worker silent this long (its event loop stuck, or the "
        "process stopped); 0 never",
        type=seconds,
        metavar="SECONDS",
    ),
    Option(
        "workers",
        default="1",
        help="worker processes serving the same sockets; auto = one per CPU",
        type=workers,
        metavar="N",
    ),
    Option(
        "max-connections",
        default="0",
        help="connections each worker holds open at once, across its listeners; more wait in "
        "the listen backlog; 0 = the open-file limit (ulimit -n) less the descriptors open at "
        "start and 16 spare",
        type=count,
        metavar="N",
    ),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """How to run: the runner settings, merged and typed, paths absolute."""

    nodaemon: bool = False
    pidfile: str | None = "tend.pid"
    log: LogConfig = field(default_factory=lambda: _log_config())
    uid: str | None = None
    gid: str | None = None
    umask: int | None = None
    rundir: str = "."
    chroot: str | None = None
    loop: str = "auto"
    shutdown_timeout: float = 10.0
    workers: int = 1
    start_timeout: float = 60.0
    worker_timeout: float = 30.0
    reload: bool = False
    console: str | None = None  # a console's socket (tend manhole), absolute
    max_connections: int = 0


def _log_config(**values: object) -> LogConfig:
    from tend.logs import LogConfig  # here: `tend --help` need not import the log handlers

    return LogConfig(**values)  # type: ignore[arg-type]


def resolve(
    command_line: Mapping[str, object], from_file: Mapping[str, object], cwd: str
) -> Settings:
    """Merge the command line over a deployment file's ``[tend]``, then the defaults.

    Both mappings are keyed by setting key (``log_max_bytes``) and hold converted
    values, None for not given; paths are already absolute. The default pidfile and log
    file live in the rundir, or where tend was started with ``--chroot``.
    """
    given = {key: value for key, value in from_file.items() if value is not None}
    given.update((key, value) for key, value in command_line.items() if value is not None)
    value = values_of(SETTINGS, given)

    def text(key: str) -> str | None:
        found = value[key]
        return None if found is None else str(found)

    nodaemon = bool(value["nodaemon"])
    chroot = text("chroot")
    if chroot is None:
        rundir = text("rundir") or cwd
        files_in = rundir
    else:
        # As twistd: the rundir is inside the new root (its top by default), while the
        # pidfile and log, opened before the chroot, default to where tend was started.
        rundir = text("rundir") or "/"
        files_in = cwd
    pidfile = text("pidfile")
    if pidfile is None:
        pidfile = os.path.join(files_in, "tend.pid")
    logfile = text("logfile")
    if logfile is None:
        logfile = None if nodaemon else os.path.join(files_in, "tend.log")
    elif logfile == "-":
        logfile = None
    backups = value["log_backups"]
    level = str(value["log_level"])
    log = _log_config(
        logfile=logfile,
        syslog=bool(value["syslog"]),
        prefix=str(value["prefix"]),
        syslog_facility=str(value["syslog_facility"]),
        syslog_address=str(value["syslog_address"]),
        max_bytes=_int(value["log_max_bytes"]),
        backups=None if backups is None else _int(backups),
        format=str(value["log_format"]),
        level=_LEVELS[level],
    )
    umask_value = value["umask"]
    return Settings(
        nodaemon=nodaemon,
        pidfile=pidfile or None,
        log=log,
        uid=text("uid"),
        gid=text("gid"),
        umask=None if umask_value is None else _int(umask_value),
        rundir=rundir,
        chroot=chroot,
        loop=str(value["loop"]),
        shutdown_timeout=_float(value["shutdown_timeout"]),
        workers=_int(value["workers"]),
        start_timeout=_float(value["start_timeout"]),
        worker_timeout=_float(value["worker_timeout"]),
        reload=bool(value["reload"]),
        console=text("console") or None,
        max_connections=_int(value["max_connections"]),
    )


# logging's numbers for --log-level, without importing logging for --help.
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def _int(value: object) -> int:
    assert isinstance(value, int), value
    return value


def _float(value: object) -> float:
    assert isinstance(value, int | float), value
    return float(value)
