"""The ``tendctl`` command: status, stop and reopen-logs for a tend found by its pidfile.

tendctl signals a process only while it holds its pidfile's lock *and* has the pidfile
open, so a pid that a dead server's pidfile still names, and that the kernel has since
given to another process (or a pid from another pid namespace, such as a container's),
is never signalled. Signals go through a pidfd, so the process checked is the process
signalled. The exit statuses of ``status`` are LSB's: 0 running, 1 not running with a
stale pidfile, 3 not running, 4 unknown. Like cli.py, this module prints and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from tend import __version__
from tend.addresses import host_and_port
from tend.control import NotTend, ask, control_path
from tend.errors import UsageError, one_line, quote
from tend.options import CommandParser, seconds
from tend.pidfile import PidfileError, PidfileState, read_pidfile

PROG = "tendctl"

# LSB's status codes (init-functions): 0 running, 1 dead with a pidfile left behind,
# 3 not running, 4 unknown. For other actions 7 is "not running".
RUNNING = 0
STALE = 1
NOT_RUNNING = 3
UNKNOWN = 4
NOT_RUNNING_ACTION = 7

DEFAULT_TIMEOUT = 15.0

# A reload waits for new workers to start, at most the start timeout (60 s by default).
RELOAD_TIMEOUT = 75.0

# How long a SIGKILLed process may take to be gone before tendctl gives up on it (a
# process blocked in the kernel, on a dead NFS server say, can't die until it returns).
KILL_WAIT = 10.0

DESCRIPTION = """\
Control a running tend through its pidfile.

  tendctl status        say whether tend runs, since when, where it listens, its workers
  tendctl reload        build the tree again and serve it with new workers (SIGHUP)
  tendctl upgrade       run the tend program anew on the same sockets (SIGUSR2)
  tendctl stop          send SIGTERM and wait until tend has stopped
  tendctl reopen-logs   send SIGUSR1: tend reopens its log file (after logrotate moved it)

tendctl asks through tend's control socket (tend.ctl beside tend.pid) where there is
one, and then waits for the outcome; else it sends the signal.

Exit statuses of status: 0 running, 1 not running but the pidfile remains (stale),
3 not running, 4 unknown. stop: 0 stopped (or was not running), 1 still running.
reload, upgrade: 0 done, 1 failed (the line says why), 7 not running.
reopen-logs: 0 sent, 7 not running. Any error: 1.
"""


class ControlError(Exception):
    """Something tendctl cannot do; its message is the line the user reads."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# -- finding the server ------------------------------------------------------------------


@dataclass(slots=True)
class Server:
    """A live tend: the pidfile it holds, its pid, and a pidfd on that very process."""

    state: PidfileState
    pid: int
    pidfd: int | None  # None where the kernel has no pidfds (before Linux 5.3)

    def signal(self, signal_number: int) -> None:
        """Send *signal_number* to this process, and no other that may reuse its pid."""
        if self.pidfd is not None:
            signal.pidfd_send_signal(self.pidfd, signal_number)
        else:
            os.kill(self.pid, signal_number)

    def wait(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for the process to end; True if it has."""
        if self.pidfd is None:
            deadline = time.monotonic() + timeout
            while process_exists(self.pid):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
            return True
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def read_state(path: str, failure: int = 1) -> PidfileState | None:
    """What the pidfile at *path* says (through tend.daemon, which tells live from stale).

    Raises:
        ControlError: with status *failure*, if the pidfile cannot be read.
    """
    try:
        return read_pidfile(path)
    except PidfileError as error:
        raise ControlError(str(error), failure) from None


def find_server(state: PidfileState) -> Server:
    """Take hold of the live tend that holds *state*'s pidfile.

    Raises:
        ControlError: the pidfile names no pid, or the pid it names is not the process
            holding it.
    """
    if state.pid is None:
        raise ControlError(f"pidfile {state.path} is locked but holds no pid; try again")
    pid = state.pid
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        raise ControlError(
            f"pidfile {quote(state.path)} is locked, but its pid {pid} is not running here "
            "(another pid namespace, such as a container?)"
        ) from None
    except OSError:  # no pidfds in this kernel: the checks below still hold
        pidfd = None
    try:
        if not holds_file(pid, state.path):
            raise ControlError(
                f"not signalling pid {pid}: it does not hold the locked pidfile "
                f"{quote(state.path)} (another pid namespace, such as a container?)"
            )
    except PermissionError:
        _close(pidfd)
        raise ControlError(
            f"cannot check that pid {pid} holds {state.path}: permission denied; "
            "run tendctl as root, or as the user who started tend"
        ) from None
    except BaseException:
        _close(pidfd)
        raise
    return Server(state, pid, pidfd)


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def holds_file(pid: int, path: str) -> bool:
    """True if process *pid* has the file at *path* open (the pidfile, for tend).

    Raises:
        PermissionError: this user may not look at that process's descriptors.
    """
    try:
        wanted = os.stat(path)
    except FileNotFoundError:
        return False
    folder = f"/proc/{pid}/fd"
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return False
    for name in names:
        try:
            opened = os.stat(f"{folder}/{name}")
        except OSError:  # closed meanwhile, or a descriptor stat() cannot follow
            continue
        if (opened.st_dev, opened.st_ino) == (wanted.st_dev, wanted.st_ino):
            return True
    return False


def process_exists(pid: int) -> bool:
    """True if *pid* names a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return _stat_fields(file.read())[0] != "Z"
    except FileNotFoundError:
        return False


def _stat_fields(text: str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    return text.rsplit(")", 1)[1].split()


# -- what /proc tells about a process ----------------------------------------------------


def uptime(pid: int) -> float | None:
    """How many seconds ago process *pid* started, from /proc; None if it can't be seen."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = _stat_fields(file.read())
        with open("/proc/uptime") as file:
            since_boot = float(file.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    # Field 22 of proc_pid_stat(5), starttime, in clock ticks after boot; fields[0] is field 3.
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return max(0.0, since_boot - started)


def listening_addresses(pid: int) -> list[str]:
    """The addresses process *pid* listens on: TCP over IPv4 and IPv6, and UNIX sockets.

    Matches the socket inodes among the process's descriptors against its network
    namespace's socket tables, as ``ss -lp`` does.

    Raises:
        OSError: the process's descriptors or tables cannot be read (another user's
            process, or one that has exited).
    """
    inodes: set[int] = set()
    folder = f"/proc/{pid}/fd"
    for name in os.listdir(folder):
        try:
            target = os.readlink(f"{folder}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    found: list[str] = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for fields in _table(pid, table):
            # sl local_address rem_address st ... inode: 0A is TCP_LISTEN.
            if fields[3] == "0A" and int(fields[9]) in inodes:
                found.append(_inet_address(fields[1], family))
    for fields in _table(pid, "unix"):
        # Num RefCount Protocol Flags Type St Inode Path: flag 00010000 is __SO_ACCEPTCON.
        if int(fields[3], 16) & 0x10000 and int(fields[6]) in inodes:
            found.append(fields[7] if len(fields) > 7 else "(unnamed UNIX socket)")
    return list(dict.fromkeys(found))


def _table(pid: int, name: str) -> list[list[str]]:
    try:
        with open(f"/proc/{pid}/net/{name}") as file:
            lines = file.read().splitlines()[1:]
    except FileNotFoundError:  # no IPv6 in this kernel, say
        return []
    return [line.split() for line in lines if line.strip()]


def _inet_address(text: str, family: socket.AddressFamily) -> str:
    """Decode /proc/net/tcp's ``0100007F:2710``: 32-bit words in host order, a hex port."""
    address_hex, port_hex = text.split(":")
    raw = bytes.fromhex(address_hex)
    words = [raw[index : index + 4] for index in range(0, len(raw), 4)]
    packed = b"".join(word[::-1] if sys.byteorder == "little" else word for word in words)
    host = socket.inet_ntop(family, packed)
    port = int(port_hex, 16)
    return host_and_port(host, port)


def describe_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``, ``3 days 4 h``."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} day{'s' if days != 1 else ''} {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


# -- the commands ------------------------------------------------------------------------


def status(path: str, out: Callable[[str], None]) -> int:
    """Say whether the tend of the pidfile at *path* runs; return LSB's status code."""
    state = read_state(path, UNKNOWN)
    if state is None:
        out(f"tend is not running (no pidfile {os.path.abspath(path)})")
        return NOT_RUNNING
    if not state.locked:
        out(
            f"tend is not running, but its pidfile {state.path} remains: it names pid "
            f"{state.pid}, and no process holds its lock (stale)"
        )
        return STALE
    if state.pid is None:
        out(f"tend is running, but its pidfile {state.path} holds no pid yet")
        return RUNNING
    seconds = uptime(state.pid)
    if seconds is None:
        out(
            f"tend is running: pid {state.pid}, which is not visible here "
            "(in another pid namespace, such as a container?)"
        )
        out(f"pidfile: {state.path}")
        return RUNNING
    started = time.strftime("%Y-%m-%d %H:%M:%S%z", time.localtime(time.time() - seconds))
    out(f"tend is running: pid {state.pid}, up {describe_duration(seconds)} (since {started})")
    out(f"pidfile: {state.path}")
    try:
        answer = _ask(state, "status", 5.0)
    except ControlError:
        answer = None
    if answer is not None:
        _describe_answer(answer, out)
        return RUNNING
    try:
        addresses = listening_addresses(state.pid)
    except OSError as error:
        out(
            f"listening on: unknown (cannot read /proc/{state.pid}/fd: {error.strerror}; "
            "run tendctl as tend's user or root)"
        )
    else:
        out(f"listening on: {', '.join(addresses) if addresses else 'nothing'}")
    return RUNNING


def _ask(state: PidfileState, command: str, timeout: float) -> dict[str, object] | None:
    """Ask the tend holding *state*'s pidfile through its control socket; None if it has
    none, so the caller sends a signal instead.

    Raises:
        ControlError: it has one, but did not answer in time or could not be understood.
    """
    path = control_path(state.path)

    def is_tend(pid: int) -> bool:
        if pid == state.pid:
            return True
        # An upgrade's new program renames its pidfile into place just before its socket.
        now = read_state(state.path)
        return now is not None and now.locked and now.pid == pid

    try:
        return ask(path, command, timeout, is_tend)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except NotTend as error:
        raise ControlError(
            f"not asking the control socket {quote(path)}: {error}; someone may have put it "
            "there: keep the pidfile in a folder only tend's user can write"
        ) from None
    except TimeoutError:
        raise ControlError(
            f"tend (pid {state.pid}) did not answer {command} within {_seconds(timeout)}; "
            "wait longer with --timeout"
        ) from None
    except PermissionError:
        raise ControlError(
            f"cannot use tend's control socket {quote(path)}: permission denied; "
            "run tendctl as root, or as the user who started tend"
        ) from None
    except (OSError, ValueError) as error:
        raise ControlError(f"cannot use tend's control socket {quote(path)}: {error}") from None


def change(
    path: str, command: str, signal_number: int, timeout: float, out: Callable[[str], None]
) -> int:
    """``reload`` or ``upgrade``: ask and wait for the outcome, or send the signal."""
    state = read_state(path)
    if state is None or not state.locked:
        raise ControlError(f"cannot {command}: tend is not running", NOT_RUNNING_ACTION)
    answer = _ask(state, command, timeout)
    if answer is None:
        server = find_server(state)
        try:
            server.signal(signal_number)
        except PermissionError:
            raise ControlError(_not_permitted(server.pid)) from None
        finally:
            server.close()
        name = signal.Signals(signal_number).name
        out(f"asked tend (pid {server.pid}) to {command} ({name}); its log says how it went")
        return 0
    message = str(answer.get("message", ""))
    if not answer.get("ok"):
        raise ControlError(message or f"tend could not {command}")
    out(message)
    return 0


def _describe_answer(answer: Mapping[str, object], out: Callable[[str], None]) -> None:
    """The control socket's status, for people: listeners, the generation, each worker."""
    listeners = _items(answer.get("listeners"))
    addresses = [
        address
        for listener in listeners
        if isinstance(listener, dict)
        for address in _items(listener.get("addresses"))
    ]
    out(f"listening on: {', '.join(map(str, addresses)) if addresses else 'nothing'}")
    generation_started = _float(answer.get("generation_started"))
    out(
        f"version: tend {answer.get('version')}; generation {answer.get('generation')}, "
        f"up {describe_duration(time.time() - generation_started)}"
        + ("; a reload is under way" if answer.get("reloading") else "")
    )
    workers = _items(answer.get("workers"))
    out(f"workers: {len(workers)}")
    for worker in workers:
        if isinstance(worker, dict):
            out(
                f"  worker {worker.get('number')}: pid {worker.get('pid')}, "
                f"generation {worker.get('generation')}, "
                f"up {describe_duration(_float(worker.get('uptime')))}, "
                f"{worker.get('connections')} connection(s) open, "
                f"{worker.get('served')} served"
                + ("" if worker.get("ready", True) else "; starting, not ready yet")
            )


def _items(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def status_json(path: str, out: Callable[[str], None]) -> int:
    """``status --json``: the same facts as one JSON document."""
    import json

    state = read_state(path, UNKNOWN)
    document: dict[str, object]
    if state is None:
        document, code = {"running": False, "pidfile": os.path.abspath(path)}, NOT_RUNNING
    elif not state.locked:
        document, code = {"running": False, "stale": True, "pidfile": state.path}, STALE
    else:
        try:
            answer = _ask(state, "status", 5.0)
        except ControlError:
            answer = None
        document = {"running": True, "pid": state.pid, "pidfile": state.path}
        if answer is not None:
            answer.pop("ok", None)
            document.update(answer)
        code = RUNNING
    out(json.dumps(document, default=str, sort_keys=True))
    return code


def stop(path: str, timeout: float, kill: bool, out: Callable[[str], None]) -> int:
    """Stop the tend of the pidfile at *path*: SIGTERM, wait, and SIGKILL if *kill*."""
    state = read_state(path)
    if state is None:
        out(f"tend is not running (no pidfile {os.path.abspath(path)})")
        return 0
    if not state.locked:
        out(
            f"tend is not running: its pidfile {state.path} is stale (no process holds "
            f"its lock), so pid {state.pid} was not signalled"
        )
        return 0
    server = find_server(state)
    try:
        try:
            server.signal(signal.SIGTERM)
        except ProcessLookupError:
            out(f"tend (pid {server.pid}) stopped")
            return 0
        except PermissionError:
            raise ControlError(_not_permitted(server.pid)) from None
        if server.wait(timeout):
            out(f"tend (pid {server.pid}) stopped")
            return 0
        if not kill:
            raise ControlError(
                f"tend (pid {server.pid}) is still running {_seconds(timeout)} after SIGTERM; "
                "wait longer with --timeout, or add --kill"
            )
        return _kill(server, timeout, out)
    finally:
        server.close()


def _kill(server: Server, timeout: float, out: Callable[[str], None]) -> int:
    # A supervisor's workers run on if it alone is killed: take them along, held by
    # pidfds opened before it dies (after that they belong to another parent).
    family = [_pidfd_or_none(pid) for pid in descendants(server.pid)]
    try:
        with contextlib.suppress(ProcessLookupError):
            server.signal(signal.SIGKILL)
        for pidfd in family:
            if pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        for pidfd in family:
            _close(pidfd)
    if not server.wait(KILL_WAIT):
        raise ControlError(f"tend (pid {server.pid}) is still running after SIGKILL")
    removed = f" and removed its pidfile {server.state.path}"
    if not remove_if_stale(server.state):
        removed = ""
    out(
        f"tend (pid {server.pid}) did not stop within {_seconds(timeout)} of SIGTERM; "
        f"killed it with SIGKILL{removed}"
    )
    return 0


def _pidfd_or_none(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """The pids of *pid*'s children, their children, and so on, from /proc."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as file:
                parent = int(_stat_fields(file.read())[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(parent, []).append(int(name))
    found: list[int] = []
    pending = [pid]
    while pending:
        children = parents.get(pending.pop(), [])
        found.extend(children)
        pending.extend(children)
    return found


def remove_if_stale(state: PidfileState) -> bool:
    """Remove the pidfile a killed tend left, if it is still that file and nobody holds it."""
    current = read_state(state.path)
    if current is None or current.locked or current.pid != state.pid:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state.path)
    return True


def reopen_logs(path: str, out: Callable[[str], None]) -> int:
    """Ask the tend of the pidfile at *path* to reopen its log file (SIGUSR1)."""
    state = read_state(path)
    if state is None:
        raise ControlError(
            f"cannot reopen the logs: tend is not running (no pidfile {os.path.abspath(path)})",
            NOT_RUNNING_ACTION,
        )
    if not state.locked:
        raise ControlError(
            f"cannot reopen the logs: tend is not running (pidfile {state.path} is stale)",
            NOT_RUNNING_ACTION,
        )
    server = find_server(state)
    try:
        server.signal(signal.SIGUSR1)
    except ProcessLookupError:
        raise ControlError(
            f"cannot reopen the logs: tend (pid {server.pid}) has just stopped",
            NOT_RUNNING_ACTION,
        ) from None
    except PermissionError:
        raise ControlError(_not_permitted(server.pid)) from None
    finally:
        server.close()
    out(f"asked tend (pid {server.pid}) to reopen its log file")
    return 0


def _not_permitted(pid: int) -> str:
    return (
        f"cannot signal tend (pid {pid}): operation not permitted; "
        "run tendctl as root, or as the user who started tend"
    )


def _seconds(value: float) -> str:
    return f"{value:g} s"


# -- the command line --------------------------------------------------------------------


def _add_pidfile_option(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--pidfile",
        metavar="PATH",
        default=default,
        help="the pidfile of the tend to control (default: tend.pid)",
    )


def parser() -> argparse.ArgumentParser:
    """The ``tendctl`` command line; --pidfile may come before or after the action."""
    top = CommandParser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_pidfile_option(top, "tend.pid")
    top.add_argument("--version", action="version", version=f"{PROG} (tend {__version__})")
    actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    status_parser = actions.add_parser(
        "status", help="say whether tend runs, since when, where it listens, its workers"
    )
    status_parser.add_argument(
        "--json", action="store_true", help="print the same facts as one JSON document"
    )
    reload_parser = actions.add_parser(
        "reload", help="build the tree again and serve it with new workers; wait for it"
    )
    upgrade_parser = actions.add_parser(
        "upgrade", help="run the tend program anew on the same sockets; wait for it"
    )
    for waiting in (reload_parser, upgrade_parser):
        waiting.add_argument(
            "--timeout",
            type=seconds,
            metavar="SECONDS",
            default=RELOAD_TIMEOUT,
            help=f"how long to wait for the outcome (default: {RELOAD_TIMEOUT:g})",
        )
    stop_parser = actions.add_parser("stop", help="send SIGTERM and wait until tend has stopped")
    stop_parser.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        default=DEFAULT_TIMEOUT,
        help=f"how long to wait for tend to stop (default: {DEFAULT_TIMEOUT:g})",
    )
    stop_parser.add_argument(
        "--kill",
        action="store_true",
        help="if tend is still running after the timeout, kill it (SIGKILL) and the "
        "processes it started, and remove its pidfile",
    )
    reopen_parser = actions.add_parser(
        "reopen-logs", help="send SIGUSR1: tend reopens its log file (after logrotate moved it)"
    )
    for action_parser in (status_parser, reload_parser, upgrade_parser, stop_parser, reopen_parser):
        # SUPPRESS: given before the action, --pidfile is not reset to a default after it.
        _add_pidfile_option(action_parser, argparse.SUPPRESS)
    return top


def run(arguments: Sequence[str], out: Callable[[str], None]) -> int:
    """Run one tendctl command; return its exit status. Raises ControlError."""
    parsed = parser().parse_args(arguments)
    if parsed.action == "status":
        return status_json(parsed.pidfile, out) if parsed.json else status(parsed.pidfile, out)
    if parsed.action == "reload":
        return change(parsed.pidfile, "reload", signal.SIGHUP, parsed.timeout, out)
    if parsed.action == "upgrade":
        return change(parsed.pidfile, "upgrade", signal.SIGUSR2, parsed.timeout, out)
    if parsed.action == "stop":
        return stop(parsed.pidfile, parsed.timeout, parsed.kill, out)
    return reopen_logs(parsed.pidfile, out)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the ``tendctl`` command and exit with its status."""

    def out(line: str) -> None:
        # What tend answered, made printable: never a terminal's escape sequence.
        print(one_line(line, limit=100_000), flush=True)

    try:
        code = run(list(sys.argv[1:] if argv is None else argv), out)
    except ControlError as error:
        print(one_line(f"{PROG}: {error}"), file=sys.stderr, flush=True)
        code = error.status
    except UsageError as error:
        print(one_line(f"{error.prog or PROG}: {error}"), file=sys.stderr)
        print(one_line(error.hint or f"try `{PROG} --help`"), file=sys.stderr, flush=True)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # `tendctl status | head`: the reader has gone; say nothing more, as ls does.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
