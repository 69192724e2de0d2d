"""The README's recipes for supervisord, start-stop-daemon and logrotate, run for real.

Each recipe is read from the README itself, with only its paths and port changed to this
test's (the README's /opt/tend/bin/tend is this venv's, /run and /var/log are tmp_path,
port 10000 a free one), so that what the README shows is what is tested.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import POEM, Daemons, Spawned, fetch, pid_alive, wait_until

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent
TEND = BIN / "tend"
TENDCTL = BIN / "tendctl"
SLOW = ["--chunk-size", "100", "--delay", "0.2"]  # 2807 bytes in about 5.6 s

needs_tend_script = pytest.mark.skipif(
    not TEND.exists(), reason=f"no tend script next to {sys.executable}"
)


def section(heading: str) -> str:
    """The README's text under *heading* (a ``###`` line), to the next heading."""
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ )", README, re.M | re.S)
    assert match is not None, f"no section {heading!r} in the README"
    return match.group(1)


def blocks(text: str, language: str = "") -> list[str]:
    """The fenced blocks of *text* whose language is *language* (`` ``` `` alone: "")."""
    found: list[str] = []
    current: list[str] | None = None
    opened = ""
    for line in text.splitlines(keepends=True):
        if current is None and line.startswith("```"):
            current, opened = [], line[3:].strip()
        elif current is not None and line.rstrip() == "```":
            if opened == language:
                found.append("".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def adapt(text: str, tmp_path: Path, port: int) -> str:
    """A README recipe with this test's paths and port."""
    return (
        text.replace("/opt/tend/bin/", f"{BIN}/")
        .replace("/run/tend.pid", str(tmp_path / "tend.pid"))
        .replace("/var/log/tend.log", str(tmp_path / "tend.log"))
        .replace("10000", str(port))
    )


def slow_fetch(port: int, result: dict[str, bytes]) -> threading.Thread:
    """Fetch in a thread, for a fetch that outlasts what the test does meanwhile."""

    def run() -> None:
        result["poem"] = fetch(port, timeout=30)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


# -- supervisord ------------------------------------------------------------------------

SUPERVISORD = shutil.which("supervisord")
needs_supervisord = pytest.mark.skipif(
    SUPERVISORD is None, reason="needs supervisord (Debian package supervisor)"
)

SUPERVISORD_CONF = """
[unix_http_server]
file={here}/supervisor.sock

[supervisord]
logfile={here}/supervisord.log
pidfile={here}/supervisord.pid
childlogdir={here}
user=root

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{here}/supervisor.sock

"""


class Supervisord:
    """supervisord in the foreground, with the README's [program:poetry]; supervisorctl."""

    def __init__(self, tmp_path: Path, port: int, options: list[str]) -> None:
        (program,) = blocks(section("Under supervisord"), "ini")
        program = adapt(program, tmp_path, port)
        program = program.replace(f"--port {port}", f"--port {port} {' '.join(options)}")
        self.conf = tmp_path / "supervisord.conf"
        self.conf.write_text(SUPERVISORD_CONF.format(here=tmp_path) + program)
        self.log = tmp_path / "supervisord.log"
        self.process = Spawned([str(SUPERVISORD), "-n", "-c", str(self.conf)], tmp_path, None)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["supervisorctl", "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def pid(self) -> int:
        output = self.ctl("pid", "poetry").stdout.strip()
        return int(output) if output.isdigit() else 0

    def running(self) -> bool:
        return "RUNNING" in self.ctl("status", "poetry").stdout


@pytest.fixture
def supervisord(tmp_path: Path) -> Iterator[tuple[Supervisord, int]]:
    """supervisord running the README's program on a free port, with a slow poem."""
    port = free_port()
    handle = Supervisord(tmp_path, port, SLOW)
    try:
        wait_until(handle.running, 20)
        yield handle, port
    finally:
        handle.process.stop(signal.SIGTERM, timeout=40)
        handle.process.kill()


@needs_supervisord
@needs_tend_script
def test_supervisorctl_stop_waits_for_the_drain(supervisord: tuple[Supervisord, int]) -> None:
    """`supervisorctl stop` during a slow poem: the poem ends whole, then tend exits 0."""
    handle, port = supervisord
    wait_until(lambda: fetch(port, timeout=30) == POEM.read_bytes(), 20)
    result: dict[str, bytes] = {}
    thread = slow_fetch(port, result)
    wait_until(lambda: "sending 2807 bytes" in _program_log(handle))
    began = time.monotonic()
    stopped = handle.ctl("stop", "poetry")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert time.monotonic() - began > 1, "the stop did not wait for the drain"
    thread.join(30)
    assert result["poem"] == POEM.read_bytes()
    log = handle.log.read_text()
    assert "stopped: poetry (exit status 0)" in log
    assert "SIGKILL" not in log


@needs_supervisord
@needs_tend_script
def test_supervisorctl_restart_and_a_crash_start_tend_again(
    supervisord: tuple[Supervisord, int],
) -> None:
    """`supervisorctl restart` gives a new tend; so does a tend killed outright."""
    handle, port = supervisord
    first = wait_until(handle.pid)
    restarted = handle.ctl("restart", "poetry")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    second = wait_until(handle.pid)
    assert second != first
    assert fetch(port, timeout=30) == POEM.read_bytes()

    # A crash: tend's supervisor killed; autorestart=true starts another.
    subprocess.run(["kill", "-KILL", str(second)], check=True)
    third = wait_until(
        lambda: handle.running() and handle.pid() not in (0, second) and handle.pid(), 30
    )
    assert third != second
    wait_until(lambda: fetch(port, timeout=30) == POEM.read_bytes(), 20)
    assert "exited: poetry (terminated by SIGKILL" in handle.log.read_text()


def _program_log(handle: Supervisord) -> str:
    return "".join(
        path.read_text(errors="replace") for path in handle.conf.parent.glob("poetry-stdout*.log")
    )


# -- start-stop-daemon ------------------------------------------------------------------

START_STOP_DAEMON = shutil.which("start-stop-daemon")


def start_stop_commands(tmp_path: Path, port: int) -> tuple[list[str], list[str]]:
    """The README's --start and --stop command lines, with this test's paths."""
    (block,) = blocks(section("With start-stop-daemon (Debian's init scripts)"), "sh")
    lines = adapt(block, tmp_path, port).replace("\\\n", " ").splitlines()
    start, stop = (shlex.split(line) for line in lines if line.strip())
    assert start[:2] == ["start-stop-daemon", "--start"]
    assert stop[:2] == ["start-stop-daemon", "--stop"]
    return start, stop


@pytest.mark.skipif(START_STOP_DAEMON is None, reason="needs start-stop-daemon (package dpkg)")
@needs_tend_script
def test_start_stop_daemon_starts_refuses_a_second_start_and_stops(
    tmp_path: Path, daemons: Daemons
) -> None:
    """--start returns once tend serves; a second --start exits 1; --stop exits 0."""
    port = free_port()
    start, stop = start_stop_commands(tmp_path, port)
    pidfile = tmp_path / "tend.pid"

    started = subprocess.run(start, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert started.returncode == 0, started.stdout + started.stderr
    daemons.add(int(pidfile.read_text()))
    assert fetch(port) == POEM.read_bytes()  # no sleep needed

    again = subprocess.run(start, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "already running" in again.stdout + again.stderr
    assert pid_alive(daemons[0])

    stopped = subprocess.run(stop, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not pid_alive(daemons[0])
    assert not pidfile.exists()
    assert "Server Shut Down." in (tmp_path / "tend.log").read_text()


# -- logrotate --------------------------------------------------------------------------

LOGROTATE = shutil.which("logrotate")


def logrotate_recipes() -> list[str]:
    """The README's logrotate blocks: the signal recipe, then copytruncate."""
    recipes = [b for b in blocks(section("Running as a daemon")) if "/var/log/tend.log {" in b]
    assert len(recipes) == 2
    return recipes


@pytest.mark.skipif(LOGROTATE is None, reason="needs logrotate (Debian package logrotate)")
@needs_tend_script
@pytest.mark.parametrize("recipe", ["postrotate", "copytruncate"])
def test_logrotate_loses_no_line_under_load(tmp_path: Path, daemons: Daemons, recipe: str) -> None:
    """Five rotations while clients fetch steadily: every line whole, none lost on a signal.

    With the signal recipe every fetch's line is in some file. With copytruncate the
    lines written during logrotate's copy are lost (the README says so); the rest are whole.
    """
    (config,) = [text for text in logrotate_recipes() if recipe in text]
    port = free_port()
    conf = tmp_path / "logrotate.conf"
    conf.write_text(adapt(config, tmp_path, port))
    conf.chmod(0o644)
    start = [
        str(TEND),
        "--pidfile",
        str(tmp_path / "tend.pid"),
        "--logfile",
        str(tmp_path / "tend.log"),
        "--log-max-bytes",
        "0",
        "poetry",
        "--port",
        str(port),
    ]
    subprocess.run(start, check=True, timeout=60, cwd=tmp_path)
    daemons.add(int((tmp_path / "tend.pid").read_text()))

    fetched = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal fetched
        while not stop.is_set():
            assert fetch(port) == POEM.read_bytes()
            fetched += 1

    clients = [threading.Thread(target=load) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        for _ in range(5):
            before = fetched
            wait_until(lambda before=before: fetched > before + 50)
            subprocess.run(
                [str(LOGROTATE), "--force", "--state", str(tmp_path / "state"), str(conf)],
                check=True,
                timeout=30,
            )
    finally:
        stop.set()
        for client in clients:
            client.join(30)
    subprocess.run([str(TENDCTL), "--pidfile", str(tmp_path / "tend.pid"), "stop"], check=True)

    files = sorted(tmp_path.glob("tend.log*"))
    assert len(files) == 6  # tend.log and five rotated
    text = "".join(path.read_text(errors="replace") for path in files)
    assert "\0" not in text  # no hole where a truncated file was written past its end
    lines = text.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in lines), "a line was cut"
    logged = sum("sending 2807 bytes of poetry" in line for line in lines)
    if recipe == "postrotate":
        assert logged == fetched
    else:
        # What tend writes between logrotate's copy and its truncate is lost, as
        # logrotate(8) warns and the README says: fewer lines, never broken ones.
        assert 0 < logged <= fetched
    assert (tmp_path / "tend.log").read_text().endswith("Server Shut Down.\n")
