"""Fixtures: real `tend` processes, real sockets on 127.0.0.1, waits with deadlines.

Teardown never signals a bare pid: by then the process a pid named may have exited and been
reaped, and the pid given to an unrelated process (the risk tend itself avoids with pidfds).

- `run_tend` starts each `tend` as the leader of a new session (`Spawned`), as systemd
  starts a service, so that its workers, and anything else it starts, share its session.
  Until the test reaps it, the leader's pid, which is the session's id, cannot be given to
  another process. Teardown kills every process found in the session by number in /proc,
  each held by a pidfd opened and then checked against /proc again, before reaping the
  leader; `Tend.wait()` likewise holds what an exited leader left behind, for teardown.
- `daemons` holds each detached daemon by a pidfd from the moment `daemons.add(pid)` is
  called. At teardown, a daemon still running is killed with the rest of its session (a
  supervisor's workers): the session is found by number in /proc, each member held by a
  pidfd checked against /proc again once open, and all of it trusted only if the daemon
  still runs after the scan, so its session's id could not have been given away meanwhile.
  Each process held gets SIGKILL through its pidfd, and teardown polls the pidfds until
  every one has exited before closing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TypeVar

import pytest

TEND = [sys.executable, "-m", "tend"]
TENDCTL = [sys.executable, "-m", "tend.ctl"]
# Run argv[2:] with the socket argv[1] as descriptor 3, passed as systemd passes it.
PASS_SOCKET = """
import os, sys
passed = int(sys.argv[1])
if passed != 3:
    os.dup2(passed, 3)
    os.close(passed)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.argv[2], sys.argv[2:])
"""
POEM = Path(__file__).resolve().parent.parent / "src" / "tend" / "poetry" / "poems" / "ecstasy.txt"


T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Poll *predicate* until it returns something true, and return that; fail after *timeout* s."""
    deadline = _Deadline(predicate, timeout)
    while not (value := predicate()):
        deadline.check(value)
        time.sleep(interval)
    return value


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109 -- wait_until's twin: the same call, the same message
    interval: float = 0.02,
) -> T:
    """wait_until for a test in the event loop: the loop runs on between polls.

    *predicate* may return an awaitable (a coroutine function that makes a connection, say),
    whose result is then the value tested.
    """
    deadline = _Deadline(predicate, timeout)
    while True:
        value = predicate()
        result = await value if inspect.isawaitable(value) else value
        if result:
            return result
        deadline.check(result)
        await asyncio.sleep(interval)


class _Deadline:
    """When a wait gives up, and what it says then; shared by wait_until and its async twin."""

    def __init__(self, predicate: Callable[[], object], timeout: float) -> None:
        self.predicate = predicate
        self.timeout = timeout
        self.end = time.monotonic() + timeout

    def check(self, last: object) -> None:
        """Fail if the deadline has passed, naming what was awaited and its *last* value."""
        if time.monotonic() > self.end:
            raise AssertionError(
                f"timed out after {self.timeout} s waiting for {_describe(self.predicate)} "
                f"(last returned {last!r})"
            )


def _describe(predicate: Callable[[], object]) -> str:
    """A lambda's source line, which says more than its repr; other callables' repr."""
    if getattr(predicate, "__name__", None) == "<lambda>":
        with contextlib.suppress(OSError, TypeError):
            return " ".join(inspect.getsource(predicate).split())
    return repr(predicate)


def fetch(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """Connect, read to end-of-file, return what arrived."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def workers_ready(tend: Tend, count: int) -> list[int]:
    """Wait until *tend* (with tend.pid in its folder) has said READY=1, and return the
    pids of its *count* workers, by worker number, as ``tendctl status`` shows them, each
    ready. A worker killed before it is ready fails the whole start: a test that kills
    one must wait for this first."""
    assert tend.wait_ready(), f"tend exited before it was ready\n{tend.output}"
    status = subprocess.run(
        [*TENDCTL, "status", "--json"], cwd=tend.cwd, capture_output=True, text=True, timeout=30
    )
    assert status.returncode == 0, status.stderr
    workers = json.loads(status.stdout)["workers"]
    assert [(worker["number"], worker["ready"]) for worker in workers] == [
        (number, True) for number in range(1, count + 1)
    ]
    return [worker["pid"] for worker in workers]


def pid_alive(pid: int) -> bool:
    """True if *pid* names a process that is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command: state, ppid, pgrp, session, ..."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()
    except OSError:  # gone, or going (reading a dying process's stat can say ESRCH)
        return None


def _session_of(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[3])


def _wait_exited(pidfds: list[int], timeout: float) -> list[int]:
    """Wait until each pidfd's process has exited; return those still running at *timeout*.

    A pidfd polls readable once its process has exited, reaped or not.
    """
    poller = select.poll()
    for pidfd in pidfds:
        poller.register(pidfd, select.POLLIN)
    running = set(pidfds)
    deadline = time.monotonic() + timeout
    while running:
        for pidfd, _ in poller.poll(math.ceil(max(0.0, deadline - time.monotonic()) * 1000)):
            poller.unregister(pidfd)
            running.discard(pidfd)
        if time.monotonic() >= deadline:
            break
    return [pidfd for pidfd in pidfds if pidfd in running]


def _exited(pidfd: int) -> bool:
    return not _wait_exited([pidfd], 0)


class Held:
    """Processes a test started, each held by a pidfd, so that teardown signals only them.

    A pid may name an unrelated process once the one it named has been reaped; a pidfd
    always names the process it was opened on, and signalling it once it is gone fails.
    """

    def __init__(self) -> None:
        self.held: list[tuple[int, int]] = []  # (pid, pidfd)

    def hold(self, pid: int) -> None:
        """Open a pidfd on *pid* now; a pid already gone is fine (nothing to kill)."""
        with contextlib.suppress(ProcessLookupError):
            self.held.append((pid, os.pidfd_open(pid)))

    def hold_session(self, session: int, pinned: Callable[[], bool]) -> None:
        """Hold every process in *session*, as found by number in /proc.

        Each pidfd is checked against /proc after it is opened, as the number might have
        been reused before. And what is found counts only if *pinned()* says afterwards that
        the session's id stayed allocated throughout: while a process of the session is
        left, not even a reaped leader's pid can be reused, and no other session can get it.
        """
        if session in (0, os.getsid(0)):
            return  # never pytest's own session
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or _session_of(int(name)) != session:
                continue
            try:
                pidfd = os.pidfd_open(int(name))
            except ProcessLookupError:
                continue
            if _session_of(int(name)) == session:
                found.append((int(name), pidfd))
            else:
                os.close(pidfd)
        if pinned():
            self.held.extend(found)
        else:
            for _, pidfd in found:
                os.close(pidfd)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL every process held, wait until each has exited, then close the pidfds."""
        try:
            for _, pidfd in self.held:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            running = _wait_exited([pidfd for _, pidfd in self.held], timeout)
            left = [pid for pid, pidfd in self.held if pidfd in running]
        finally:
            for _, pidfd in self.held:
                os.close(pidfd)
            self.held.clear()
        if left:
            raise AssertionError(f"still running {timeout} s after SIGKILL: pids {left}")


def shim_proxy_plugin(folder: Path) -> None:
    """Make `poetry-proxy` findable from *folder*, should the installed tend not name it.

    pyproject.toml names the entry point, but an install made before it did (a stale
    .venv) would not have it: then a `tend_plugins/` file in *folder* stands in.
    """
    if not entry_points(group="tend.plugins", name="poetry-proxy"):
        plugins = folder / "tend_plugins"
        plugins.mkdir(exist_ok=True)
        (plugins / "poetry_proxy.py").write_text(
            "from tend.poetry.plugin import proxy_service_maker as proxy_service_maker\n"
        )


class Spawned:
    """A subprocess started as the leader of a new session, as systemd starts a service, its
    output going to files that the test can read as it runs.

    Its session holds what it starts (workers, a process per connection); kill() kills
    them all. A detached daemon leaves the session: record it with `daemons`.
    """

    name = "the process"  # for failure messages

    def __init__(
        self,
        command: list[str],
        cwd: Path,
        env: dict[str, str] | None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.cwd = cwd
        self.stdout_path = cwd / f"stdout.{id(self)}"
        self.stderr_path = cwd / f"stderr.{id(self)}"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                command,
                cwd=cwd,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                pass_fds=pass_fds,
                start_new_session=True,
            )
        # Until we reap it, a child's pid, and so its session's id, cannot name another.
        self._pidfd = os.pidfd_open(self.process.pid)
        self._leftovers = Held()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def output(self) -> str:
        """Both outputs, for a failure message."""
        return f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"

    @property
    def exited(self) -> bool:
        """True once the process has exited; unlike Popen.poll(), this does not reap it."""
        return self.process.returncode is not None or _exited(self._pidfd)

    def wait_for_output(
        self, pattern: str, timeout: float = 10.0, source: str = "stdout"
    ) -> re.Match[str]:
        """Wait for *pattern* to appear in the process's output (or a file path)."""

        def look() -> re.Match[str] | None:
            text = getattr(self, source) if source in ("stdout", "stderr") else _read(source)
            match = re.search(pattern, text, re.MULTILINE)
            if match is None and self.exited:
                text = getattr(self, source) if source in ("stdout", "stderr") else _read(source)
                match = re.search(pattern, text, re.MULTILINE)
                if match is None:
                    raise AssertionError(
                        f"{self.name} exited ({self.wait()}) "
                        f"before printing {pattern!r}\n{self.output}"
                    )
            return match

        return wait_until(look, timeout)

    def stop(self, signal_number: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process and wait for its exit status."""
        if not self.exited:
            with contextlib.suppress(ProcessLookupError):  # it has just exited
                signal.pidfd_send_signal(self._pidfd, signal_number)
        return self.wait(timeout)

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the exit status; kill() later kills what it left in its session."""
        if self.process.returncode is None:
            if _wait_exited([self._pidfd], timeout):
                raise subprocess.TimeoutExpired(self.process.args, timeout)
            # Exited but not reaped: its session's id is still ours to look for.
            self._leftovers.hold_session(self.pid, pinned=self._unreaped)
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL the process and all in its session, and wait until every one has exited."""
        try:
            if self.process.returncode is None:
                self._leftovers.hold_session(self.pid, pinned=self._unreaped)
            self._leftovers.kill()
        finally:
            if self.process.returncode is None:
                self.process.kill()  # safe: Popen signals only a child it has not reaped
                self.process.wait()
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1

    def _unreaped(self) -> bool:
        return self.process.returncode is None


class Tend(Spawned):
    """A `tend` subprocess (see Spawned)."""

    name = "tend"

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        env: dict[str, str] | None,
        wrapper: Sequence[str] = (),
        notify: bool = True,
    ) -> None:
        # tend tells systemd READY=1 once every worker serves: with *notify* it tells a
        # socket of this test the same (unless the test set NOTIFY_SOCKET itself), and
        # stop() waits for it. A thread reads it all along, as systemd does: sends into a
        # full queue block, as sd_notify's do.
        environment = dict(os.environ if env is None else env)
        self._ready = threading.Event()
        self._notify: socket.socket | None = None
        self._reader: threading.Thread | None = None
        if notify and "NOTIFY_SOCKET" not in environment:
            name = f"tend-test-{os.getpid()}-{id(self)}"
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify.bind(f"\0{name}")
            environment["NOTIFY_SOCKET"] = f"@{name}"
            self._reader = threading.Thread(target=self._read_notifications, daemon=True)
            self._reader.start()
        try:
            # A wrapper (setpriv, strace) that execs tend keeps its pid.
            super().__init__([*wrapper, *TEND, *args], cwd, environment)
        except BaseException:
            self._close_notify()
            raise

    def _read_notifications(self) -> None:
        assert self._notify is not None
        while message := self._notify.recv(65536):  # b"" once _close_notify shuts it
            if b"READY=1" in message.split(b"\n"):
                self._ready.set()

    def _close_notify(self) -> None:
        """Shut the socket (waking the reader), wait for the reader, then close it: its
        descriptor is not reused while the reader could still read it."""
        if self._notify is None:
            return
        with contextlib.suppress(OSError):
            self._notify.shutdown(socket.SHUT_RDWR)
        if self._reader is not None:
            self._reader.join(5)
        self._notify.close()
        self._notify = None

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until tend has said READY=1 (True) or has exited without saying it (False)."""
        assert self._notify is not None, "this tend has no notify socket of the test's"

        def said_ready_or_exited() -> str | None:
            if self._ready.is_set():
                return "ready"
            return "exited" if self.exited and not self._ready.wait(0.2) else None

        return wait_until(said_ready_or_exited, timeout) == "ready"

    def stop(
        self, signal_number: int = signal.SIGTERM, timeout: float = 15.0, *, when_ready: bool = True
    ) -> int:
        """Signal tend once it is ready (a stop before it is ready fails the start, by
        design: pass *when_ready* False to test that) and wait for its exit status."""
        if when_ready and self._notify is not None and not self.exited:
            self.wait_ready(timeout)
        return super().stop(signal_number, timeout)

    def kill(self) -> None:
        try:
            super().kill()
        finally:
            self._close_notify()

    def wait_for_port(self, timeout: float = 10.0, source: str = "stdout") -> int:
        """Wait for the listener's start line and return the port it bound."""
        return int(self.wait_for_output(r"starting on (\d+)", timeout, source).group(1))


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def run_once(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run tend to completion (a start that fails, a launcher that detaches); its outputs."""
    return subprocess.run(
        [*TEND, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_usage_error(stderr: str, command: str, message: str) -> None:
    """*stderr* is argparse's one line for `tend COMMAND` holding *message*, then the hint."""
    lines = stderr.splitlines()
    assert lines[0].startswith(f"tend {command}: error: "), stderr
    assert message in lines[0], stderr
    assert lines[1:] == [f"try `tend {command} --help`"], stderr


@pytest.fixture
def run_tend(tmp_path: Path) -> Iterator[Callable[..., Tend]]:
    """Start `tend` with the given arguments in *tmp_path*; kill what is left at the end."""
    started: list[Tend] = []

    def start(
        *args: str,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
        notify: bool = True,
    ) -> Tend:
        environment = dict(os.environ if env is None else env)
        environment.setdefault("PYTHONUNBUFFERED", "1")
        handle = Tend(list(args), cwd or tmp_path, environment, wrapper, notify)
        started.append(handle)
        return handle

    yield start
    with contextlib.ExitStack() as stack:  # each is killed even if killing another fails
        for handle in started:
            stack.callback(handle.kill)


class Daemons(list[int]):
    """Pids of detached daemons a test started, each held by a pidfd from when it is added."""

    def __init__(self) -> None:
        super().__init__()
        self._held = Held()

    def add(self, pid: int) -> None:
        """Record the daemon *pid* (read from its pidfile, say) and hold it by a pidfd now."""
        super().append(pid)
        self._held.hold(pid)

    append = add  # so tests written for the plain list of pids keep working

    def kill(self) -> None:
        """SIGKILL each daemon still running, with its session (workers), and wait for them."""
        for pid, pidfd in list(self._held.held):
            session = _session_of(pid)
            if session is not None and not _exited(pidfd):
                # Read by number, the session is the daemon's if the daemon still runs
                # after the scan: its pid was never free to name another process meanwhile.
                self._held.hold_session(session, pinned=lambda pidfd=pidfd: not _exited(pidfd))
        self._held.kill()


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    """Detached daemons a test started (`daemons.add(pid)`); all killed at the end."""
    started = Daemons()
    yield started
    started.kill()
