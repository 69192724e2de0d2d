"""Run a command for real and check the promise every bad input is owed.

The promise (the hardening issue): exit status 2 (usage) or 1 (file or start), one line on
standard error naming the bad thing and why (at most 200 characters, no control
characters), at most one more line of the form ``try `tend poetry --help` ``, no traceback
on the terminal or in a log (but for the user's own code, in the log), within 2 s, and
nothing left behind: no process, pidfile, socket file or half-made folder, and no file
outside tend's own changed.

Every process a case starts carries ``TEND_TORTURE=<uuid>`` in its environment, which its
children, daemons and workers inherit; after the run, /proc is scanned for it, so a
daemon that escaped its session is found too. Leftovers are recorded as a failure and
killed through pidfds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import unicodedata
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
PROGRAMS = {
    "tend": BIN / "tend",
    "tendctl": BIN / "tendctl",
    "get-poetry": BIN / "get-poetry",
}
POEM = Path(__file__).resolve().parents[2] / "src" / "tend" / "poetry" / "poems" / "ecstasy.txt"

MARKER = "TEND_TORTURE"
GUARD = 5.0  # the `timeout` around every run
PROMISED = 2.0  # every bad input is refused within this many seconds
LINE_LIMIT = 200
HELP_LINE = re.compile(r"try `[^`\n]{1,80} --help`")
# A victim's mtime, set before each run, so that a write shows even within one clock tick.
OLD_MTIME = 1_000_000_000

# A network namespace with loopback alone, for cases whose names may reach DNS.
OFFLINE = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']

# Environment variables a case must not inherit from whoever runs the suite.
SCRUBBED = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC")


# -- what a case is ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Put:
    """Something a case makes in its folder before the run (paths may hold @TOKENS@)."""

    path: str
    kind: str = "file"  # file, dir, fifo, link, device, socket
    data: bytes | str = b""
    target: str = ""  # for a link
    device: tuple[int, int] = (1, 3)  # for a device: major, minor
    mode: int | None = None


def file(path: str, data: bytes | str = b"") -> Put:
    return Put(path, "file", data)


def folder(path: str) -> Put:
    return Put(path, "dir")


def fifo(path: str) -> Put:
    return Put(path, "fifo")


def link(path: str, target: str) -> Put:
    return Put(path, "link", target=target)


def device(path: str, major: int, minor: int) -> Put:
    return Put(path, "device", device=(major, minor))


def socket_file(path: str) -> Put:
    return Put(path, "socket")


@dataclass(frozen=True, slots=True)
class Case:
    """One bad input: the command to run, what to set up, and what must come out.

    *args* follow the program; they, and the files' contents, may hold @CASE@ (the case's
    folder, also the working directory), @OUT@ (a folder beside it holding victims),
    @PKI@ (certificates), @POEM@ (the bundled poem) and @BUSY@ (a port something listens
    on). *status* is the exit status owed, or the statuses allowed where the manual does
    not say which; *expect* is a word the line must hold (case-insensitive).
    """

    kind: str
    name: str
    args: tuple[str, ...]
    status: int | tuple[int, ...]
    expect: str | None = None
    program: str = "tend"
    files: tuple[Put, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    root_only: bool = False
    user_code: bool = False  # a traceback of the user's own code may go to the log
    lock: str | None = None  # a file (in the case folder) the suite holds locked meanwhile
    may_create: tuple[str, ...] = ()  # regexes of names the run may leave (a log, say)
    # A name the case gives may be looked up in DNS: run it in a network namespace of its
    # own with only loopback, so that no query leaves this machine.
    offline: bool = False

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def statuses(self) -> tuple[int, ...]:
        return self.status if isinstance(self.status, tuple) else (self.status,)


@dataclass(slots=True)
class Outcome:
    """What a run did, and each way it broke the promise."""

    argv: list[str]
    status: int | None = None
    elapsed: float = 0.0
    stdout: bytes = b""
    stderr: bytes = b""
    problems: list[str] = field(default_factory=list)

    def report(self) -> str:
        shown = " ".join(_shell_quote(arg) for arg in self.argv)
        err = self.stderr.decode(errors="backslashreplace")
        out = self.stdout.decode(errors="backslashreplace")
        return (
            f"command: {shown}\nexit status: {self.status}, {self.elapsed:.2f} s\n"
            + "".join(f"PROBLEM: {problem}\n" for problem in self.problems)
            + f"stderr ({len(self.stderr)} bytes):\n{_clip(err)}\n"
            + f"stdout ({len(self.stdout)} bytes):\n{_clip(out)}"
        )


def _clip(text: str, limit: int = 3000) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more)"


def _shell_quote(arg: str) -> str:
    if re.fullmatch(r"[\w@%+=:,./-]+", arg):
        return arg
    if arg.isprintable() and "'" not in arg:
        return f"'{arg}'"
    return "$'" + arg.encode("unicode_escape", "backslashreplace").decode() + "'"


# -- the places a case works in -------------------------------------------------------------


@dataclass(slots=True)
class Place:
    """A short temporary folder for one case: ``case/`` to work in, ``out/`` with victims.

    Short, because tend's messages name absolute paths and the line has 200 characters.
    """

    root: Path
    case: Path
    out: Path
    tokens: dict[str, str]

    @classmethod
    def make(cls, pki: Path | None = None) -> Place:
        root = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
        os.chmod(root, 0o755)
        case = root / "c"
        out = root / "o"
        case.mkdir()
        out.mkdir()
        (out / "victim").write_bytes(b"a victim's bytes\n")
        (out / "empty").write_bytes(b"")
        (out / "dir").mkdir()
        tokens = {
            "@CASE@": str(case),
            "@OUT@": str(out),
            "@POEM@": str(POEM),
            "@PKI@": str(pki or out),
        }
        return cls(root, case, out, tokens)

    def substitute(self, text: str) -> str:
        for token, value in self.tokens.items():
            text = text.replace(token, value)
        return text

    def put(self, item: Put) -> None:
        path = self.case / self.substitute(item.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if item.kind == "file":
            data = item.data
            path.write_bytes(self.substitute(data).encode() if isinstance(data, str) else data)
        elif item.kind == "dir":
            path.mkdir(exist_ok=True)
        elif item.kind == "fifo":
            os.mkfifo(path)
        elif item.kind == "link":
            path.symlink_to(self.substitute(item.target))
        elif item.kind == "device":
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(*item.device))
        elif item.kind == "socket":
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(str(path))
        else:
            raise ValueError(item.kind)
        if item.mode is not None:
            os.chmod(path, item.mode)

    def age_everything(self) -> None:
        """Give every file an old mtime, so any write by the run shows."""
        for path in _walk(self.root):
            if not path.is_symlink():
                with contextlib.suppress(OSError):
                    os.utime(path, (OLD_MTIME, OLD_MTIME))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _walk(root: Path) -> Iterator[Path]:
    yield root
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            yield Path(folder) / name


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str
    size: int
    mtime: int
    mode: int
    digest: str | None
    target: str | None


def snapshot(root: Path) -> dict[str, Entry]:
    """Every entry below *root*: its type, size, mtime, mode, and a digest of a file's bytes."""
    entries: dict[str, Entry] = {}
    for path in _walk(root):
        try:
            info = path.lstat()
        except OSError:
            continue
        mode = info.st_mode
        digest = target = None
        if stat.S_ISREG(mode):
            kind = "file"
            with contextlib.suppress(OSError), open(path, "rb") as handle:
                digest = hashlib.sha256(handle.read()).hexdigest()
        elif stat.S_ISDIR(mode):
            kind = "dir"
        elif stat.S_ISLNK(mode):
            kind = "link"
            target = os.readlink(path)
        elif stat.S_ISFIFO(mode):
            kind = "fifo"
        elif stat.S_ISSOCK(mode):
            kind = "socket"
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "device"
        else:
            kind = "other"
        mtime = info.st_mtime_ns if kind in ("file", "device", "fifo") else 0
        entries[str(path.relative_to(root))] = Entry(
            kind, info.st_size if kind == "file" else 0, mtime, mode, digest, target
        )
    return entries


def compare(
    before: Mapping[str, Entry], after: Mapping[str, Entry], may_create: Sequence[str]
) -> list[str]:
    """What the run changed: each a problem unless it is a log the run may leave."""
    problems = []
    allowed = [re.compile(pattern) for pattern in (*may_create, r"(.*/)?tend\.log(\.\d+)?")]
    for name, entry in before.items():
        now = after.get(name)
        if now is None:
            problems.append(f"removed {name!r} ({entry.kind}), which tend does not own")
        elif now.kind != entry.kind:
            problems.append(f"replaced {name!r}: it was a {entry.kind}, now a {now.kind}")
        elif entry.kind == "link" and now.target != entry.target:
            problems.append(f"changed link {name!r}: {entry.target!r} -> {now.target!r}")
        elif entry.kind in ("file", "device", "fifo") and (
            now.digest != entry.digest or now.mtime != entry.mtime or now.size != entry.size
        ):
            problems.append(f"changed {entry.kind} {name!r} (bytes or mtime), not tend's own")
        elif (now.mode & 0o7777) != (entry.mode & 0o7777):
            problems.append(f"changed the mode of {name!r}: {entry.mode:o} -> {now.mode:o}")
    for name, entry in after.items():
        if name in before:
            continue
        base = name.rsplit("/", 1)[-1]
        if entry.kind == "dir":
            problems.append(f"left a new folder {name!r} behind")
        elif entry.kind == "socket":
            problems.append(f"left a socket file {name!r} behind")
        elif ".pid" in base or base.endswith(".tmp"):
            problems.append(f"left a pidfile (or its temporary) {name!r} behind")
        elif entry.kind == "file" and any(pattern.fullmatch(name) for pattern in allowed):
            continue
        else:
            problems.append(f"left a new {entry.kind} {name!r} behind")
    return problems


# -- processes ------------------------------------------------------------------------------


def marked_processes(marker: str) -> list[tuple[int, str]]:
    """Processes (not zombies) whose environment holds ``TEND_TORTURE=marker``: pid, command."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                environment = handle.read()
            if needle not in environment.split(b"\0"):
                continue
            with open(f"/proc/{name}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
            if state == b"Z":
                continue
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found.append((int(name), command[:160]))
    return found


def kill_marked(marker: str, timeout: float = 5.0) -> list[tuple[int, str]]:
    """SIGKILL every process carrying *marker*, through pidfds; return those found."""
    found = marked_processes(marker)
    pidfds = []
    for pid, _ in found:
        with contextlib.suppress(ProcessLookupError):
            pidfds.append(os.pidfd_open(pid))
    # Checked again once held: a pid read from /proc may have been reused meanwhile.
    still = {pid for pid, _ in marked_processes(marker)}
    try:
        poller = select.poll()
        for pidfd in pidfds:
            pid = _pid_of_pidfd(pidfd)
            if pid in still:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + timeout
        waiting = set(pidfds)
        while waiting and time.monotonic() < deadline:
            for pidfd, _ in poller.poll(100):
                waiting.discard(pidfd)
                poller.unregister(pidfd)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
    return found


def _pid_of_pidfd(pidfd: int) -> int | None:
    with contextlib.suppress(OSError), open(f"/proc/self/fdinfo/{pidfd}") as handle:
        for line in handle:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return None


def case_environment(marker: str, extra: Mapping[str, str] = {}) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key not in SCRUBBED}
    environment[MARKER] = marker
    environment.pop("PYTEST_CURRENT_TEST", None)
    environment.update(extra)
    return environment


# -- checking the one line ------------------------------------------------------------------


def control_characters(text: str) -> list[str]:
    """The control and format characters in *text* (C0, DEL, C1, bidi overrides ...)."""
    return [
        character for character in text if unicodedata.category(character) in ("Cc", "Cf", "Cs")
    ]


def check_one_line(stderr: bytes, expect: str | None = None) -> list[str]:
    """What is wrong with *stderr* as the one line the promise allows."""
    problems = []
    if b"Traceback" in stderr:
        problems.append("a traceback on standard error")
    try:
        text = stderr.decode("utf-8")
    except UnicodeDecodeError:
        problems.append("standard error is not UTF-8 text (a raw undecodable byte)")
        text = stderr.decode("utf-8", errors="surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    else:
        if text:
            problems.append("standard error does not end with a newline")
    helps = [line for line in lines if HELP_LINE.fullmatch(line)]
    others = [line for line in lines if not HELP_LINE.fullmatch(line)]
    if len(helps) > 1:
        problems.append(f"{len(helps)} 'try ... --help' lines; at most one is allowed")
    if len(others) != 1:
        problems.append(f"{len(others)} lines on standard error (besides a try-help line), not 1")
    for line in others:
        if len(line) > LINE_LIMIT:
            problems.append(f"a line of {len(line)} characters, over {LINE_LIMIT}")
        bad = control_characters(line)
        if bad:
            shown = "".join(sorted({f"U+{ord(c):04X}" for c in bad}))
            problems.append(f"control characters in the line: {shown}")
    if expect is not None and len(others) == 1 and expect.casefold() not in others[0].casefold():
        problems.append(f"the line does not name {expect!r}")
    return problems


def has_traceback(data: bytes) -> bool:
    return b"Traceback (most recent call last)" in data or b"Traceback" in data


# -- running one case ----------------------------------------------------------------------


class BusyPort:
    """A port something listens on (so a bind to it fails), on 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def run_case(case: Case, pki: Path | None = None) -> Outcome:
    """Set *case* up in a fresh folder, run it with a 5 s guard, and check the promise."""
    place = Place.make(pki)
    busy = BusyPort()
    place.tokens["@BUSY@"] = str(busy.port)
    lock_fd = None
    try:
        for item in case.files:
            place.put(item)
        if case.lock is not None:
            lock_fd = _hold_lock(place.case / case.lock)
        place.age_everything()
        before = snapshot(place.root)
        marker = uuid.uuid4().hex
        arguments = [place.substitute(arg) for arg in case.args]
        argv = [str(PROGRAMS[case.program]), *arguments]
        outcome = Outcome(argv)
        environment = case_environment(
            marker, {key: place.substitute(value) for key, value in case.env}
        )
        stdout_path = place.root / "stdout"
        stderr_path = place.root / "stderr"
        guard = ["timeout", "--kill-after=1", str(GUARD)]
        if case.offline:
            guard = [*OFFLINE, *guard]
        started = time.monotonic()
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            completed = subprocess.run(
                [*guard, *argv],
                cwd=place.case,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                check=False,
            )
        outcome.elapsed = time.monotonic() - started
        outcome.status = completed.returncode
        outcome.stdout = stdout_path.read_bytes()
        outcome.stderr = stderr_path.read_bytes()
        stdout_path.unlink()
        stderr_path.unlink()
        left = _leftovers(marker)
        if lock_fd is not None:
            os.close(lock_fd)
            lock_fd = None
        after = snapshot(place.root)
        outcome.problems = _judge(case, outcome, left, before, after, place)
        return outcome
    finally:
        busy.close()
        if lock_fd is not None:
            os.close(lock_fd)
        place.remove()


def _hold_lock(path: Path) -> int:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _leftovers(marker: str) -> list[tuple[int, str]]:
    """Processes of the case still there half a second after it returned, killed."""
    deadline = time.monotonic() + 0.5
    while marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return kill_marked(marker) if marked_processes(marker) else []


def _judge(
    case: Case,
    outcome: Outcome,
    left: list[tuple[int, str]],
    before: Mapping[str, Entry],
    after: Mapping[str, Entry],
    place: Place,
) -> list[str]:
    problems = []
    status = outcome.status
    guarded = outcome.elapsed >= GUARD - 0.1
    if status in (124, 137, -9) and guarded:
        problems.append(f"still running after the {GUARD:g} s guard (killed), not refused")
    elif status is not None and status < 0:
        problems.append(f"died of signal {-status}, expected exit status {case.statuses}")
    elif status not in case.statuses:
        wanted = " or ".join(str(s) for s in case.statuses)
        problems.append(f"exit status {status}, expected {wanted}")
    if outcome.elapsed > PROMISED and not guarded:
        problems.append(f"took {outcome.elapsed:.2f} s, over {PROMISED:g} s")
    problems += check_one_line(outcome.stderr, case.expect)
    logs = [outcome.stdout] + [
        (place.root / name).read_bytes()
        for name, entry in after.items()
        if entry.kind == "file" and re.search(r"\.log(\.\d+)?$", name)
    ]
    if any(has_traceback(log) for log in logs) and not case.user_code:
        problems.append("a traceback in the log, not from the user's own code")
    for pid, command in left:
        problems.append(f"left process {pid} running: {command}")
    problems += compare(before, after, case.may_create)
    return problems


# -- servers a scenario keeps running ---------------------------------------------------------


class Background:
    """A command a scenario runs in the background, marked, its output going to files.

    Everything it starts carries the marker, so `kill` finds and kills all of it, detached
    daemons and workers included.
    """

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path,
        env: Mapping[str, str] = {},
        prefix: Sequence[str] = (),
    ) -> None:
        self.marker = uuid.uuid4().hex
        self.cwd = cwd
        self.stdout_path = cwd / f".out.{self.marker[:8]}"
        self.stderr_path = cwd / f".err.{self.marker[:8]}"
        environment = case_environment(self.marker, env)
        environment["PYTHONUNBUFFERED"] = "1"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [*prefix, *argv],
                cwd=cwd,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def read(self, source: str | Path = "stdout") -> str:
        """The output so far: "stdout", "stderr", or a file (a log) as a path."""
        if source == "stdout":
            return self.stdout
        if source == "stderr":
            return self.stderr
        try:
            return Path(source).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(
        self, pattern: str, timeout: float = 10.0, source: str | Path = "stdout"
    ) -> re.Match[str]:
        """Wait for *pattern* in the output (or a log file); fail with the output if not."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.read(source), re.MULTILINE)
            if match:
                return match
            if self.process.poll() is not None or time.monotonic() > deadline:
                match = re.search(pattern, self.read(source), re.MULTILINE)
                if match:
                    return match
                raise AssertionError(
                    f"no {pattern!r} from {self.process.args} (exit {self.process.poll()})\n"
                    f"stdout:\n{_clip(self.stdout)}\nstderr:\n{_clip(self.stderr)}"
                    + (
                        f"\n{source}:\n{_clip(self.read(source))}"
                        if isinstance(source, Path)
                        else ""
                    )
                )
            time.sleep(0.02)

    def port(self, timeout: float = 10.0, source: str | Path = "stdout") -> int:
        return int(self.wait_for(r"starting on (\d+)", timeout, source).group(1))

    def workers(self, source: str | Path = "stdout") -> list[int]:
        pattern = r"started worker \d+ \(pid (\d+)\)"
        return [int(pid) for pid in re.findall(pattern, self.read(source))]

    def processes(self) -> list[tuple[int, str]]:
        return marked_processes(self.marker)

    def signal(self, signal_number: int) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal_number)

    def wait(self, timeout: float = 15.0) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> list[tuple[int, str]]:
        """Kill everything carrying the marker; return what was still running."""
        found = kill_marked(self.marker)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        return found


def proc_status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status."""
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def rss_kib(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fetch(port: int, timeout: float = 10.0) -> bytes:
    """Everything the server on 127.0.0.1:*port* sends before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)
