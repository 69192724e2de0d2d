"""Fault scenarios, each bounded in time: what tend does when the world goes wrong.

- a server SIGKILLed mid-poem gives its client a reset, never a clean short poem;
- out of descriptors (``prlimit --nofile=64``) under 500 concurrent fetchers, on asyncio
  and on uvloop: standard error stays small, the log within its limit, and fetches work
  again within 2 s of the load ending;
- a full disk (a 64 KiB tmpfs) never tears a log line and prints no "Logging error";
- a SIGSTOPped worker of ``--workers 2`` is noticed and replaced (``--worker-timeout``);
- a SIGTERM in a widened window (strace delays the pidfile's rename, or a UNIX socket's
  bind) leaves no pidfile and no socket file;
- the proxy in front of a 100 MiB poem stays bounded in memory;
- a server's RSS and descriptors before and after 10,000 fetches.

The short form (in `make test`) runs them at a smaller scale.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torture.conftest import FULL, figure, record, scale, scratch_folder
from torture.harness import (
    POEM,
    PROGRAMS,
    Background,
    fd_count,
    fetch,
    kill_marked,
    marked_processes,
    proc_status,
    rss_kib,
)

TEND = str(PROGRAMS["tend"])
LOCAL = "tcp:0:interface=127.0.0.1"
POEM_SIZE = POEM.stat().st_size

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
needs_strace = pytest.mark.skipif(
    shutil.which("strace") is None, reason="needs strace (make torture installs it)"
)
pytestmark = pytest.mark.timeout(300 if FULL else 120)


@pytest.fixture
def place() -> Iterator[Path]:
    with scratch_folder("flt") as folder:
        yield folder


async def hammer(
    port: int, clients: int, seconds: float, total: int | None = None
) -> dict[str, int]:
    """*clients* fetchers looping for *seconds* (or until *total* fetches); count outcomes."""
    counts = {"whole": 0, "short": 0, "failed": 0}
    deadline = time.monotonic() + seconds
    budget = [total if total is not None else 10**12]

    async def one() -> None:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            try:
                async with asyncio.timeout(5):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    try:
                        data = await reader.read()
                    finally:
                        writer.close()
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()
                counts["whole" if len(data) == POEM_SIZE else "short"] += 1
            except (OSError, TimeoutError):
                counts["failed"] += 1
                await asyncio.sleep(0.01)

    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(one())
    return counts


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """Let this process hold the fetchers' sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- SIGKILL mid-poem ------------------------------------------------------------------------


def test_server_killed_mid_poem_resets_the_client(
    place: Path, background: list[Background], request: pytest.FixtureRequest
) -> None:
    """SIGKILL to a slow server mid-poem: the client sees a reset, never end-of-file."""
    record(request, "fault", "SIGKILL mid-poem gives the client a reset")
    server = Background(
        [
            TEND,
            "--nodaemon",
            "--pidfile=",
            "poetry",
            "--port",
            LOCAL,
            "--chunk-size",
            "100",
            "--delay",
            "0.2",
        ],
        place,
    )
    background.append(server)
    port = server.port()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        received = b""
        while len(received) < 200:
            chunk = sock.recv(65536)
            assert chunk, "the server closed before sending 200 bytes"
            received += chunk
        kill_marked(server.marker)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            return
    pytest.fail(
        f"a clean end-of-file after {len(received)} of {POEM_SIZE} bytes: "
        "the client cannot tell this cut poem from a whole one"
    )


# -- out of descriptors ----------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_out_of_descriptors_then_recovers(
    loop: str,
    place: Path,
    background: list[Background],
    many_descriptors: None,
    request: pytest.FixtureRequest,
) -> None:
    """prlimit --nofile=64 and 500 fetchers: small stderr, log in its limit, back in 2 s."""
    label = f"EMFILE on {loop}: 500 fetchers, then recovery"
    record(request, "fault", label)
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux)")
    limit = 100_000
    server = Background(
        [
            TEND,
            "--nodaemon",
            "--pidfile=",
            "--loop",
            loop,
            "-l",
            "tend.log",
            "--log-max-bytes",
            str(limit),
            "--log-backups",
            "2",
            "poetry",
            "--port",
            LOCAL,
        ],
        place,
        prefix=["prlimit", "--nofile=64", "--"],
    )
    background.append(server)
    port = server.port(source=place / "tend.log")
    seconds = scale(3, 10)
    counts = asyncio.run(hammer(port, 500, seconds))
    ended = time.monotonic()
    recovered = None
    while time.monotonic() - ended < 5:
        with contextlib.suppress(OSError):
            if fetch(port, timeout=1) == POEM.read_bytes():
                recovered = time.monotonic() - ended
                break
        time.sleep(0.05)
    stderr_bytes = server.stderr_path.stat().st_size
    logs = sorted(place.glob("tend.log*"))
    sizes = {path.name: path.stat().st_size for path in logs}
    figure(request, f"{loop} fetches whole/short/failed", "/".join(map(str, counts.values())))
    figure(request, f"{loop} recovery s", "never" if recovered is None else f"{recovered:.2f}")
    figure(request, f"{loop} stderr bytes", stderr_bytes)
    problems = []
    if server.process.poll() is not None:
        problems.append(f"tend exited ({server.process.returncode}) under the load")
    if recovered is None or recovered > 2:
        problems.append(f"fetches did not work again within 2 s (recovered: {recovered})")
    if stderr_bytes > 4096:
        problems.append(f"{stderr_bytes} bytes on standard error: {server.stderr[:300]!r}")
    if any(size > limit for size in sizes.values()):
        problems.append(f"a log file over its {limit} bytes: {sizes}")
    if len(logs) > 3:
        problems.append(f"{len(logs)} log files kept with --log-backups 2: {sorted(sizes)}")
    if counts["short"]:
        problems.append(f"{counts['short']} fetches got a clean short poem")
    assert not problems, "\n".join(problems)


# -- a full disk -----------------------------------------------------------------------------

LINE = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d{4} \[[^\]]*\] .*")


@needs_root
@pytest.mark.parametrize("max_bytes", [0, 20_000])
def test_full_disk_never_tears_a_log_line(
    max_bytes: int, place: Path, background: list[Background], request: pytest.FixtureRequest
) -> None:
    """A 64 KiB tmpfs fills up: every line in the log is whole, no "Logging error" anywhere."""
    record(request, "fault", f"full disk, --log-max-bytes {max_bytes}")
    disk = place / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    server = Background(
        [
            TEND,
            "--nodaemon",
            "--pidfile=",
            "-l",
            str(disk / "tend.log"),
            "--log-max-bytes",
            str(max_bytes),
            "poetry",
            "--port",
            LOCAL,
        ],
        place,
    )
    background.append(server)
    port = server.port(source=disk / "tend.log")
    for _ in range(int(scale(1000, 3000))):
        fetch(port)
    server.signal(signal.SIGTERM)
    status = server.wait(15)
    problems = []
    if "Logging error" in server.stderr or "Traceback" in server.stderr:
        problems.append(f"standard error: {server.stderr[:400]!r}")
    for path in sorted(disk.glob("tend.log*")):
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            problems.append(f"{path.name} ends in a torn line: {data[-80:]!r}")
        for number, line in enumerate(data.split(b"\n")[:-1], start=1):
            if not LINE.fullmatch(line):
                problems.append(f"{path.name} line {number} is torn: {line[:80]!r}")
                break
    figure(request, f"full disk {max_bytes}: exit", status)
    assert not problems, "\n".join(problems)


# -- a stopped worker -------------------------------------------------------------------------


def test_stopped_worker_is_replaced(
    place: Path, background: list[Background], request: pytest.FixtureRequest
) -> None:
    """A SIGSTOPped worker of --workers 2 is noticed (--worker-timeout 2) and replaced."""
    record(request, "fault", "SIGSTOPped worker of --workers 2 replaced")
    server = Background(
        [
            TEND,
            "--nodaemon",
            "--pidfile=",
            "--workers",
            "2",
            "--worker-timeout",
            "2",
            "poetry",
            "--port",
            LOCAL,
        ],
        place,
    )
    background.append(server)
    try:
        server.wait_for(r"starting on (\d+)(.|\n)*starting on (\d+)")
    except AssertionError as error:
        pytest.fail(f"tend --workers 2 --worker-timeout 2 did not start: {error}", pytrace=False)
    first, _second = server.workers()
    pidfd = os.pidfd_open(first)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if len(server.workers()) >= 3 and not os.path.exists(f"/proc/{first}/stat"):
                break
            time.sleep(0.1)
        else:
            pytest.fail(
                f"worker {first} stopped for 10 s was not replaced\n{server.stdout[-1500:]}",
                pytrace=False,
            )
    finally:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGCONT)
        os.close(pidfd)


# -- signals in widened windows ---------------------------------------------------------------


def traced_child(trace: Background) -> int:
    """The tend that strace started (its first marked child that is not strace)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid, command in marked_processes(trace.marker):
            ours = "strace" not in command.split()[0] and "bin/tend" in command
            if ours and proc_status(pid).get("PPid") == str(trace.process.pid):
                return pid
        time.sleep(0.01)
    raise AssertionError("strace started no tend")


@needs_strace
def test_sigterm_during_pidfile_rename_leaves_no_pidfile(
    place: Path, background: list[Background], request: pytest.FixtureRequest
) -> None:
    """With the rename held 400 ms by strace, a SIGTERM then leaves neither pidfile nor temp."""
    record(request, "fault", "SIGTERM during the pidfile's rename")
    calls = "rename,renameat,renameat2"
    trace = Background(
        [TEND, "--nodaemon", "--pidfile", "p.pid", "poetry", "--port", LOCAL],
        place,
        prefix=[
            "strace",
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            f"trace={calls}",
            "-e",
            f"inject={calls}:delay_exit=400000",
        ],
    )
    background.append(trace)
    tend = traced_child(trace)
    deadline = time.monotonic() + 10
    while not (place / "p.pid").exists():
        assert time.monotonic() < deadline, f"no pidfile appeared\n{trace.stdout}{trace.stderr}"
        time.sleep(0.005)
    os.kill(tend, signal.SIGTERM)  # tend is strace's child, unreaped: its pid is still its own
    status = trace.wait(20)
    left = [path.name for path in place.iterdir() if "pid" in path.name]
    assert status is not None, "tend did not stop within 20 s of SIGTERM"
    assert not left, f"left behind: {left}\n{trace.stdout[-1500:]}"


@needs_strace
def test_sigterm_during_unix_bind_leaves_no_socket_file(
    place: Path, background: list[Background], request: pytest.FixtureRequest
) -> None:
    """With bind() held 400 ms by strace, a SIGTERM then leaves no socket file."""
    record(request, "fault", "SIGTERM during a unix: bind")
    trace = Background(
        [TEND, "--nodaemon", "--pidfile", "p.pid", "poetry", "--port", f"unix:{place}/s.sock"],
        place,
        prefix=[
            "strace",
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=bind",
            "-e",
            "inject=bind:delay_exit=400000",
        ],
    )
    background.append(trace)
    tend = traced_child(trace)
    deadline = time.monotonic() + 10
    while not (place / "s.sock").exists():
        assert time.monotonic() < deadline, f"no socket appeared\n{trace.stdout}{trace.stderr}"
        time.sleep(0.005)
    os.kill(tend, signal.SIGTERM)
    status = trace.wait(20)
    left = [path.name for path in place.iterdir() if path.name in ("s.sock", "p.pid")]
    assert status is not None, "tend did not stop within 20 s of SIGTERM"
    assert not left, f"left behind: {left}\n{trace.stdout[-1500:]}"


# -- memory and descriptors ----------------------------------------------------------------------


def test_proxy_of_a_100_mib_poem_stays_bounded(
    place: Path, background: list[Background], request: pytest.FixtureRequest
) -> None:
    """The proxy in front of a 100 MiB poem grows by less than half the poem in RSS."""
    record(request, "fault", "proxy of a 100 MiB poem: bounded RSS")
    size = 100 * 1024 * 1024
    big = place / "big.txt"
    with open(big, "wb") as handle:
        handle.write((b"So, so, break off this last lamenting kiss,\n" * (size // 44 + 1))[:size])
    upstream = Background(
        [
            *(TEND, "--nodaemon", "--pidfile=", "poetry", "--port", LOCAL),
            *("--poem", str(big), "--max-poem-bytes", str(2 * size)),
        ],
        place,
    )
    background.append(upstream)
    upstream_port = upstream.port(30)
    proxy = Background(
        [
            TEND,
            "--nodaemon",
            "--pidfile=",
            "poetry-proxy",
            "--port",
            LOCAL,
            "--server",
            f"127.0.0.1:{upstream_port}",
            "--timeout",
            "60",
        ],
        place,
    )
    background.append(proxy)
    port = proxy.port()
    (worker,) = proxy.workers()
    before = rss_kib(worker)
    received = 0
    with (
        socket.create_connection(("127.0.0.1", port), timeout=60) as sock,
        contextlib.suppress(ConnectionResetError),
    ):
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    peak = int(proc_status(worker)["VmHWM"].split()[0])
    figure(request, "proxy RSS before KiB", before)
    figure(request, "proxy peak RSS KiB", peak)
    figure(request, "proxy bytes relayed", received)
    assert peak - before < size // 2 // 1024, (
        f"the proxy's peak RSS grew by {(peak - before) // 1024} MiB for a 100 MiB poem"
    )
    # Over the proxy's --max-poem-bytes (4 MiB by default) the fetch fails: nothing is
    # relayed or cached, and the proxy says why in its log.
    assert received == 0
    proxy.wait_for("the poem is larger than")


def test_rss_and_descriptors_hold_over_many_fetches(
    place: Path,
    background: list[Background],
    many_descriptors: None,
    request: pytest.FixtureRequest,
) -> None:
    """After 10,000 fetches a server holds the descriptors it held, and about the same RSS."""
    total = int(scale(1000, 10_000))
    label = f"RSS and descriptors over {total} fetches"
    record(request, "fault", label)
    server = Background(
        [TEND, "--nodaemon", "--pidfile=", "-l", "tend.log", "poetry", "--port", LOCAL], place
    )
    background.append(server)
    port = server.port(source=place / "tend.log")
    (worker,) = server.workers(source=place / "tend.log")
    supervisor = server.process.pid
    asyncio.run(hammer(port, 20, 60, total=200))
    time.sleep(0.2)
    before = (rss_kib(worker), fd_count(worker), rss_kib(supervisor), fd_count(supervisor))
    counts = asyncio.run(hammer(port, 50, 300, total=total))
    deadline = time.monotonic() + 5
    while fd_count(worker) > before[1] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = (rss_kib(worker), fd_count(worker), rss_kib(supervisor), fd_count(supervisor))
    for name, b, a in zip(
        ("worker RSS KiB", "worker fds", "supervisor RSS KiB", "supervisor fds"),
        before,
        after,
        strict=True,
    ):
        figure(request, name, f"{b} -> {a}")
    figure(request, "fetches whole/short/failed", "/".join(map(str, counts.values())))
    problems = []
    if after[1] > before[1] or after[3] > before[3]:
        problems.append(
            f"descriptors grew: worker {before[1]}->{after[1]}, supervisor {before[3]}->{after[3]}"
        )
    if after[0] - before[0] > 8192 or after[2] - before[2] > 8192:
        problems.append(f"RSS grew by more than 8 MiB: {before} -> {after}")
    if counts["failed"] or counts["short"]:
        problems.append(f"fetches failed or came short: {counts}")
    assert not problems, "\n".join(problems)
