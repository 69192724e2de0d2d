"""The ``tend`` command: parse the command line, pick the tree, hand it to the lifecycle.

With ctl.py and the poetry client, the only modules that print to the terminal or exit.
Errors a user can fix are one line on standard error (``tend: ...``): exit 2 for a
command-line mistake, 1 for a failed start.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from tend.errors import TendError, UsageError, one_line, quote
from tend.files import working_directory

PROG = "tend"


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the ``tend`` command and exit with its status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        status = run_command(arguments)
    except UsageError as error:
        say(f"{error.prog or PROG}: {error}", error.hint)
        sys.exit(2)
    except TendError as error:
        if error.already_said:  # in the journal already, from the log on the same stream
            sys.exit(1)
        _fail(str(error), 1)
    except KeyboardInterrupt:
        _fail("interrupted before the services were ready", 1)
    sys.exit(status)


def _fail(message: str, status: int, hint: str | None = None) -> NoReturn:
    say(f"{PROG}: {message}", hint)
    sys.exit(status)


def say(line: str, hint: str | None = None) -> None:
    """Print *line* for the user as one line on standard error, and the *hint* after it."""
    # stderr may already be /dev/null in a detached daemon; the log has the line anyway.
    with contextlib.suppress(OSError):
        print(one_line(line), file=sys.stderr, flush=hint is None)
        if hint is not None:
            print(one_line(hint), file=sys.stderr, flush=True)


DESCRIPTION = """\
Run asyncio network services as a production Unix service: detached, with a pidfile,
rotated logs or syslog, dropped privileges and a clean stop on SIGTERM.

  tend [options] PLUGIN [plugin options]   run a plugin's service
  tend [options] -y APPFILE                run the `application` defined in APPFILE
  tend [options] -c DEPLOY.toml            run the services a deployment file lists
  tend PLUGIN --help                       show a plugin's options
"""


def command_parser() -> argparse.ArgumentParser:
    """The parser for ``tend``'s own options, those before the plugin name."""
    from tend import __version__
    from tend.options import CommandParser, add_options
    from tend.settings import SETTINGS

    parser = CommandParser(
        prog=PROG,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] {PLUGIN [plugin options] | -y APPFILE | -c DEPLOY.toml}",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "-y", "--python", metavar="APPFILE", help="run the `application` defined in APPFILE"
    )
    source.add_argument(
        "-c", "--config", metavar="DEPLOY.toml", help="run the services a deployment file lists"
    )
    add_options(parser, SETTINGS, negatable=True)
    parser.add_argument(
        "--version",
        action="version",
        version=f"tend {__version__} (Python {sys.version.split()[0]})",
    )
    parser.add_argument("plugin", nargs="?", metavar="PLUGIN", help=argparse.SUPPRESS)
    parser.add_argument("plugin_arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _abandon(message: str) -> NoReturn:
    """End the process now, from any thread, with *message* as the user's one line."""
    from tend import daemon

    say(f"{PROG}: {message}")
    daemon.exit_now(1)


def run_command(arguments: list[str]) -> int:
    """Parse *arguments*, build the chosen tree and run it; return the exit status."""
    parser = command_parser()
    parsed = parser.parse_args(arguments)
    if parsed.python is None and parsed.config is None and parsed.plugin is None:
        print(parser.format_help())
        _list_plugins()
        return 0
    if parsed.plugin is not None and (parsed.python or parsed.config):
        flag = "-y" if parsed.python else "-c"
        raise UsageError(
            f"give a plugin or {flag}, not both: {quote(parsed.plugin)} was given with {flag}"
        )
    from tend.sources import AppFileSource, DeploymentSource, PluginSource, TreeSource

    from_file: Mapping[str, object] = {}
    source: TreeSource
    if parsed.python is not None:
        source = AppFileSource(parsed.python)
    elif parsed.config is not None:
        from tend.deploy import Deployment

        source = DeploymentSource(parsed.config)
        deployment = source.load()
        assert isinstance(deployment, Deployment)
        from_file = deployment.settings
    else:
        source = PluginSource(parsed.plugin, parsed.plugin_arguments)
        source.check()
    from tend.settings import SETTINGS, resolve

    given = {option.key: getattr(parsed, option.key) for option in SETTINGS}
    settings = resolve(given, from_file, working_directory())
    if settings.console is not None:
        from tend.sources import WithConsole

        source = WithConsole(source, settings.console)

    from tend.lifecycle import run

    return run(settings, source, _abandon)


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
