"""The runner's command-line options: one table for the command line and deployment files.

``tend``'s argument parser and the converters of its option values. Deployment files read
the same table, so a ``[tend]`` key accepts exactly what its option does. Makes no OS calls
and prints nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

from tend import __version__

PROG = "tend"

DESCRIPTION = """\
Run asyncio network services as a production Unix service: detached, with a pidfile,
rotated logs or syslog, dropped privileges and a clean stop on SIGTERM.

  tend [options] PLUGIN [plugin options]   run a plugin's service
  tend [options] -y APPFILE                run the `application` defined in APPFILE
  tend [options] -c DEPLOY.toml            run the services a deployment file lists
  tend PLUGIN --help                       show a plugin's options
"""


def _octal(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid umask {text!r}: expected octal, like 022"
        ) from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"invalid umask {text!r}: expected 000 to 777")
    return value


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a whole number")
    return int(text)


# A day: longer than any drain anyone means, and short enough for every timer to hold.
LONGEST_SHUTDOWN = 86_400.0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= LONGEST_SHUTDOWN:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected seconds from 0 to {LONGEST_SHUTDOWN:.0f}"
        )
    return value


def workers_count(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid worker count {text!r}: expected a number >= 1, or auto"
        )
    return int(text)


def runner_parser() -> argparse.ArgumentParser:
    """The parser for the runner's own options (those before the plugin name)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] {PLUGIN [plugin options] | -y APPFILE | -c DEPLOY.toml}",
    )
    add = parser.add_argument
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "-y", "--python", metavar="APPFILE", help="run the `application` defined in APPFILE"
    )
    source.add_argument(
        "-c", "--config", metavar="DEPLOY.toml", help="run the services a deployment file lists"
    )
    add("-n", "--nodaemon", action="store_true", default=None, help="stay in the foreground")
    add(
        "--pidfile",
        metavar="PATH",
        help="pidfile to write (default: tend.pid in the rundir; '' for none)",
    )
    add(
        "-l",
        "--logfile",
        metavar="PATH",
        help="log file; '-' is standard output "
        "(default: tend.log detached, standard output with --nodaemon)",
    )
    add(
        "--log-max-bytes",
        type=_non_negative_int,
        metavar="N",
        help="rotate the log file before it passes N bytes (default: 1000000; 0 never)",
    )
    add(
        "--log-backups",
        type=_non_negative_int,
        metavar="N",
        help="keep N rotated log files (default: all)",
    )
    add("--log-format", choices=("text", "json"), help="log line format (default: text)")
    add("--syslog", action="store_true", default=None, help="log to syslog instead of a file")
    add("--prefix", metavar="TAG", help="syslog tag (default: tend)")
    add("--syslog-facility", metavar="NAME", help="syslog facility (default: user)")
    add(
        "--syslog-address",
        metavar="ADDRESS",
        help="syslog socket path or HOST:PORT (default: /dev/log)",
    )
    add("-u", "--uid", metavar="USER", help="user name or id to run as")
    add(
        "-g",
        "--gid",
        metavar="GROUP",
        help="group name or id to run as (default: the user's group)",
    )
    add(
        "--umask",
        type=_octal,
        metavar="MODE",
        help="umask (default: 0077 detached, unchanged with --nodaemon)",
    )
    add("-d", "--rundir", metavar="DIR", help="directory to run in (default: .)")
    add("--chroot", metavar="DIR", help="chroot to DIR before starting")
    add(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        help="event loop; auto is uvloop when installed, else asyncio (default: auto)",
    )
    add(
        "--shutdown-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="how long connections may finish after SIGTERM (default: 10)",
    )
    add(
        "--workers",
        type=workers_count,
        metavar="N",
        help="worker processes serving the same sockets; auto = one per CPU (default: 1)",
    )
    add(
        "--version",
        action="version",
        version=f"tend {__version__} (Python {sys.version.split()[0]})",
    )
    add("plugin", nargs="?", metavar="PLUGIN", help=argparse.SUPPRESS)
    add("plugin_arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser
