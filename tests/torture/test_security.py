"""Security checks, as root: a dropped worker cannot get root back, and nothing is followed.

- with ``-u nobody`` every thread of the worker has nobody's ids and no capabilities, and
  real attempts to regain root, made from inside the worker, all fail;
- a ``tend.log`` swapped for a symlink (to a victim file or a device) before
  ``tendctl reopen-logs`` leaves the victim untouched;
- of 20 simultaneous starts on one pidfile exactly one wins;
- with ``--chroot DIR -u nobody`` no descriptor of the worker leads outside the jail;
- TLS below 1.2 is refused;
- the poetry proxy connects to its upstream and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torture.conftest import record, scratch_folder
from torture.harness import (
    OLD_MTIME,
    POEM,
    PROGRAMS,
    Background,
    check_one_line,
    fetch,
    proc_status,
)

TEND = str(PROGRAMS["tend"])
LOCAL = "tcp:0:interface=127.0.0.1"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def place() -> Iterator[Path]:
    with scratch_folder("sec") as folder:
        yield folder


# -- no way back to root ------------------------------------------------------------------------

REGAIN_APP = """
import ctypes, logging, os, threading, time
import tend
from tend.poetry.server import PoetryFactory, PoetryService

log = logging.getLogger("regain")
libc = ctypes.CDLL(None, use_errno=True)


def prctl_ambient_raise():
    # PR_CAP_AMBIENT (47), PR_CAP_AMBIENT_RAISE (2), CAP_SETUID (7)
    if libc.prctl(47, 2, 7, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")


def capset_all():
    # capset(2) with version 3 and every capability effective and permitted.
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)(0xFFFFFFFF, 0xFFFFFFFF, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def write_setgroups():
    with open("/proc/self/setgroups", "w") as handle:
        handle.write("allow")


ATTEMPTS = [
    ("setuid(0)", lambda: os.setuid(0)),
    ("setresuid(0, 0, 0)", lambda: os.setresuid(0, 0, 0)),
    ("setresgid(0, 0, 0)", lambda: os.setresgid(0, 0, 0)),
    ("setgroups([0])", lambda: os.setgroups([0])),
    ("write /proc/self/setgroups", write_setgroups),
    ("prctl ambient CAP_SETUID", prctl_ambient_raise),
    ("capset all", capset_all),
    ("open /etc/shadow", lambda: open("/etc/shadow").close()),
]


class Regain(tend.Service):
    async def start_service(self):
        await super().start_service()
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
        for name, attempt in ATTEMPTS:
            try:
                attempt()
            except Exception as error:
                log.info("REGAIN %s: refused (%s)", name, type(error).__name__)
            else:
                log.warning("REGAIN %s: SUCCEEDED", name)
        log.info("REGAIN done (uid %d euid %d)", os.getuid(), os.geteuid())


application = tend.Application("regain")
poetry = PoetryService(POEM)
poetry.set_service_parent(application)
Regain("regain").set_service_parent(application)
tend.StreamServer("LOCAL", PoetryFactory(poetry)).set_service_parent(application)
"""


@needs_root
def test_worker_as_nobody_cannot_regain_root(
    place: Path, background: list[Background], request: pytest.FixtureRequest
) -> None:
    """Every thread of a -u nobody worker is nobody with no capabilities; regaining fails."""
    record(request, "security", "worker as nobody: ids, capabilities, 8 ways back to root")
    app = place / "regain.py"
    app.write_text(f"POEM = {str(POEM)!r}\n" + REGAIN_APP.replace("LOCAL", LOCAL))
    app.chmod(0o644)
    server = Background([TEND, "--nodaemon", "--pidfile=", "-u", "nobody", "-y", str(app)], place)
    background.append(server)
    server.wait_for(r"REGAIN done")
    problems = [line for line in server.stdout.splitlines() if "SUCCEEDED" in line]
    (worker,) = server.workers()
    nobody = "65534"
    for task in os.listdir(f"/proc/{worker}/task"):
        status = proc_status(int(f"{worker}") if task == str(worker) else int(task))
        for key in ("Uid", "Gid"):
            if set(status[key].split()) != {nobody}:
                problems.append(f"thread {task}: {key} {status[key]}")
        if status["Groups"].split() not in ([], [nobody]):
            problems.append(f"thread {task}: supplementary groups {status['Groups']}")
        for key in ("CapEff", "CapPrm", "CapAmb", "CapInh"):
            if int(status[key], 16) != 0:
                problems.append(f"thread {task}: {key} {status[key]}")
    threads = len(os.listdir(f"/proc/{worker}/task"))
    record(
        request,
        "security",
        "worker as nobody: ids, capabilities, 8 ways back to root",
        threads_checked=threads,
    )
    assert threads >= 2, "the app's thread did not show"
    assert not problems, "\n".join(problems)


# -- symlinks and devices in place of the log --------------------------------------------------


@needs_root
@pytest.mark.parametrize("victim_kind", ["file", "device"])
def test_log_swapped_for_a_symlink_leaves_the_victim_alone(
    victim_kind: str, place: Path, background: list[Background], request: pytest.FixtureRequest
) -> None:
    """tend.log replaced by a symlink before reopen-logs: the victim keeps its bytes and mtime."""
    record(request, "security", f"tend.log swapped for a symlink to a {victim_kind}, reopened")
    outside = place / "outside"
    outside.mkdir()
    victim = outside / "victim"
    if victim_kind == "file":
        victim.write_bytes(b"precious\n")
    else:
        os.mknod(victim, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, as /dev/null
    os.utime(victim, (OLD_MTIME, OLD_MTIME))
    before = victim.lstat()
    run = place / "run"
    run.mkdir()
    server = Background(
        [TEND, "--nodaemon", "--pidfile", "p.pid", "-l", "tend.log", "poetry", "--port", LOCAL],
        run,
    )
    background.append(server)
    port = server.port(source=run / "tend.log")
    (run / "tend.log").rename(run / "tend.log.moved")
    (run / "tend.log").symlink_to(victim)
    reopen = subprocess.run(
        [str(PROGRAMS["tendctl"]), "--pidfile", "p.pid", "reopen-logs"],
        cwd=run,
        capture_output=True,
        check=False,
    )
    for _ in range(5):
        fetch(port)
    time.sleep(0.3)  # the log writes in bursts at most 50 ms apart; give it several
    after = victim.lstat()
    problems = []
    if victim_kind == "file" and victim.read_bytes() != b"precious\n":
        problems.append(f"the victim's bytes changed: {victim.read_bytes()[:80]!r}")
    if after.st_mtime_ns != before.st_mtime_ns:
        problems.append("the victim's mtime changed")
    for pid, _ in server.processes():
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                opened = os.stat(f"/proc/{pid}/fd/{name}")
                if (opened.st_dev, opened.st_ino) == (before.st_dev, before.st_ino):
                    problems.append(f"pid {pid} holds the victim open (fd {name})")
    assert not problems, f"{problems}\ntendctl said: {reopen.stdout!r} {reopen.stderr!r}"


# -- one winner ---------------------------------------------------------------------------------


def test_twenty_simultaneous_starts_have_one_winner(
    place: Path, background: list[Background], request: pytest.FixtureRequest
) -> None:
    """20 tends started at once on one pidfile: one serves, 19 refuse in one line, exit 1."""
    record(request, "security", "20 simultaneous starts on one pidfile")
    starts = [
        Background([TEND, "--nodaemon", "--pidfile", "p.pid", "poetry", "--port", LOCAL], place)
        for _ in range(20)
    ]
    background.extend(starts)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        running = [start for start in starts if start.process.poll() is None]
        serving = [start for start in running if "starting on" in start.stdout]
        if len(running) <= 1 and serving:
            break
        time.sleep(0.05)
    running = [start for start in starts if start.process.poll() is None]
    problems = []
    if len(running) != 1:
        problems.append(f"{len(running)} still running, not 1")
    for start in starts:
        if start.process.poll() is None:
            continue
        if start.process.returncode != 1:
            problems.append(f"a loser exited {start.process.returncode}, not 1")
        problems += [
            f"a loser's stderr: {problem}: {start.stderr[:300]!r}"
            for problem in check_one_line(start.stderr.encode(), "running")
        ]
    if len(running) == 1:
        named = (place / "p.pid").read_text().strip()
        if named != str(running[0].process.pid):
            problems.append(f"the pidfile names {named}, the winner is {running[0].process.pid}")
    assert not problems, "\n".join(sorted(set(problems)))


# -- the jail -----------------------------------------------------------------------------------


@needs_root
def test_chrooted_worker_holds_nothing_outside_the_jail(
    place: Path, background: list[Background], request: pytest.FixtureRequest
) -> None:
    """With --chroot DIR -u nobody no descriptor of the worker is a folder or a file outside."""
    record(request, "security", "--chroot -u nobody: the worker's descriptors")
    jail = place / "jail"
    jail.mkdir()
    shutil.copy(POEM, jail / "poem.txt")
    os.chmod(jail / "poem.txt", 0o644)
    server = Background(
        [
            TEND,
            "--nodaemon",
            "--pidfile",
            "p.pid",
            "-l",
            "tend.log",
            "--chroot",
            str(jail),
            "-u",
            "nobody",
            "poetry",
            "--port",
            LOCAL,
            "--poem",
            "/poem.txt",
        ],
        place,
    )
    background.append(server)
    server.port(source=place / "tend.log")
    (worker,) = server.workers(source=place / "tend.log")
    problems = []
    root = os.readlink(f"/proc/{worker}/root")
    if root != str(jail):
        problems.append(f"the worker's root is {root}, not the jail")
    for name in sorted(os.listdir(f"/proc/{worker}/fd"), key=int):
        if int(name) <= 2:
            continue  # standard streams: whoever started tend chose them
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{worker}/fd/{name}")
            if not target.startswith("/"):
                continue  # a socket, a pipe, an anon_inode
            info = os.stat(f"/proc/{worker}/fd/{name}")
            inside = target == str(jail) or target.startswith(str(jail) + "/")
            if os.path.isdir(f"/proc/{worker}/fd/{name}") and not inside:
                # A folder inside the jail (uvloop holds its root) leads nowhere else.
                problems.append(f"fd {name} is a folder outside the jail: {target}")
            elif not inside and target != "/dev/null":
                problems.append(
                    f"fd {name} leads outside the jail: {target} (mode {info.st_mode:o})"
                )
    assert not problems, "\n".join(problems)


# -- TLS versions -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["tls1", "tls1_1"])
def test_tls_below_1_2_is_refused(
    version: str,
    pki: Path,
    place: Path,
    background: list[Background],
    request: pytest.FixtureRequest,
) -> None:
    """openssl s_client -tls1 / -tls1_1 gets no session; -tls1_2 does (the control)."""
    record(request, "security", f"TLS: {version} refused")
    endpoint = f"tls:0:interface=127.0.0.1:certKey={pki}/cert.pem:privateKey={pki}/key.pem"
    server = Background([TEND, "--nodaemon", "--pidfile=", "poetry", "--port", endpoint], place)
    background.append(server)
    port = server.port()

    def handshake(option: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                f"-{option}",
                "-cipher",
                "DEFAULT@SECLEVEL=0",
                "-brief",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )

    control = handshake("tls1_2")
    assert control.returncode == 0, f"the TLS 1.2 control failed: {control.stderr}"
    old = handshake(version)
    if "no protocols available" in old.stderr:
        pytest.skip(f"this openssl cannot offer {version} at all")
    assert old.returncode != 0, f"{version} was accepted: {old.stdout} {old.stderr}"
    assert "CONNECTION ESTABLISHED" not in old.stderr + old.stdout


# -- the proxy's connections --------------------------------------------------------------------


def test_proxy_connects_only_to_its_upstream(
    place: Path, background: list[Background], request: pytest.FixtureRequest
) -> None:
    """Under strace, every connect() the proxy makes goes to its upstream; a canary hears none."""
    record(request, "security", "the proxy connects only to its upstream")
    if shutil.which("strace") is None:
        pytest.skip("needs strace (make torture installs it)")
    upstream = Background([TEND, "--nodaemon", "--pidfile=", "poetry", "--port", LOCAL], place)
    background.append(upstream)
    upstream_port = upstream.port()
    canary = socket.socket()
    canary.bind(("127.0.0.1", 0))
    canary.listen(16)
    canary.setblocking(False)
    canary_port = canary.getsockname()[1]
    trace = place / "connect.trace"
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
            "--cache-ttl",
            "0",
        ],
        place,
        prefix=["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace)],
    )
    background.append(proxy)
    port = proxy.port(30)
    try:
        for attempt in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                # A client that tries to steer the proxy elsewhere.
                with contextlib.suppress(OSError):
                    sock.sendall(
                        f"GET http://127.0.0.1:{canary_port}/ HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{canary_port}\r\n\r\n127.0.0.1:{canary_port}\n".encode()
                    )
                with contextlib.suppress(OSError):
                    while sock.recv(65536):
                        pass
            del attempt
        proxy.signal(15)
        proxy.wait(15)
        with pytest.raises(BlockingIOError):
            canary.accept()
    finally:
        canary.close()
    connects = [
        line for line in trace.read_text().splitlines() if "connect(" in line and "AF_INET" in line
    ]
    elsewhere = [line for line in connects if f"htons({upstream_port})" not in line]
    assert connects, "the proxy made no connection at all"
    assert not elsewhere, "\n".join(elsewhere[:10])
