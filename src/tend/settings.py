"""The runner's settings: one table, from which the command line and ``[tend]`` are made.

Each row of `SETTINGS` is an option with its name, type, default and help; the ``tend``
command line gets them through argparse (flags with a ``--no-`` form), a deployment
file's ``[tend]`` table takes the same names with the same conversion, and `resolve`
turns what was given into the typed `Settings` a run follows. Makes no OS calls and
prints nothing.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tend.errors import UsageError, quote
from tend.options import Flag, Option, count, seconds, values_of

if TYPE_CHECKING:
    from tend.logs import LogConfig

LOOPS = ("auto", "asyncio", "uvloop")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def umask(text: str) -> int:
    """An octal file mode creation mask, 000 to 777."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid umask {quote(text)}: expected octal, like 022"
        ) from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"invalid umask {quote(text)}: expected 000 to 777")
    return value


def workers(text: str) -> int:
    """A number of worker processes, 1 or more, or ``auto`` for one per CPU."""
    if text == "auto":
        return os.cpu_count() or 1
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid worker count {quote(text)}: expected a number >= 1, or auto"
        )
    return int(text)


SETTINGS: tuple[Option | Flag, ...] = (
    Flag("nodaemon", "n", "stay in the foreground"),
    Option(
        "pidfile",
        help="pidfile to write (default: tend.pid in the rundir; '' for none)",
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
    Flag("syslog", None, "log to syslog instead of a file"),
    Option("prefix", default="tend", help="syslog tag", metavar="TAG"),
    Option("syslog-facility", default="user", help="syslog facility", metavar="NAME"),
    Option(
        "syslog-address",
        default="/dev/log",
        help="syslog socket path or HOST:PORT",
        metavar="ADDRESS",
    ),
    Option("uid", "u", help="user name or id to run as", metavar="USER"),
    Option(
        "gid",
        "g",
        help="group name or id to run as (default: the user's group)",
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

    Raises:
        UsageError: a value that makes no sense with the others.
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
    if pidfile == "-":
        raise UsageError("cannot use '-' as the pidfile: give a path, or '' for none")
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
