"""`tendctl status|stop|reopen-logs` against real tend processes and real pidfiles."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEND, TENDCTL, pid_alive, wait_until

from tend.ctl import describe_duration, listening_addresses
from tend.errors import quote

LOCAL = ["--port", "tcp:0:interface=127.0.0.1"]

# An app whose stop_service takes an hour: a tend that does not stop on SIGTERM in time.
STUBBORN_APP = """\
import asyncio

import tend


class Stubborn(tend.Service):
    async def stop_service(self):
        await asyncio.sleep(3600)


application = tend.Application("stubborn")
Stubborn().set_service_parent(application)
tend.StreamServer("tcp:0:interface=127.0.0.1", asyncio.Protocol).set_service_parent(application)
"""


def tendctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TENDCTL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def start_with_pidfile(run_tend, *args: str):  # type: ignore[no-untyped-def]
    """Start tend in the foreground with tend.pid, and wait until it serves."""
    tend = run_tend("--nodaemon", "--pidfile", "tend.pid", *args)
    port = tend.wait_for_port()
    return tend, port


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[str]]:
    """A live process that is not tend and blocks SIGTERM and SIGUSR1, so that a signal
    sent to it stays pending where /proc shows it."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    yield process
    process.kill()
    process.communicate()


def pending_signals(pid: int) -> int:
    """The signals sent to *pid* and not yet delivered (blocked ones stay here)."""
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)


# status


def test_status_without_a_pidfile_is_3(tmp_path: Path) -> None:
    """No pidfile: "not running", exit 3 (LSB)."""
    result = tendctl("status", cwd=tmp_path)
    assert result.returncode == 3
    assert result.stdout == f"tend is not running (no pidfile {tmp_path / 'tend.pid'})\n"
    assert result.stderr == ""


def children_of(pid: int) -> list[int]:
    """The pids whose parent is *pid* (a supervisor's workers)."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_status_of_a_running_tend_is_0(run_tend, tmp_path):
    """A live tend: its pid, uptime, pidfile and listening address, exit 0."""
    tend, port = start_with_pidfile(run_tend, "poetry", *LOCAL)
    wait_until((tmp_path / "tend.pid").exists)

    result = tendctl("status", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(
        rf"tend is running: pid {tend.pid}, up \d+ s \(since \d{{4}}-\d\d-\d\d [\d:]+[+-]\d{{4}}\)",
        lines[0],
    ), lines
    assert lines[1:3] == [f"pidfile: {tmp_path / 'tend.pid'}", f"listening on: 127.0.0.1:{port}"]
    assert re.fullmatch(r"version: tend [\d.]+; generation 1, up \d+ s", lines[3]), lines
    assert lines[4] == "workers: 1"
    (worker,) = children_of(tend.pid)
    assert re.fullmatch(
        rf"  worker 1: pid {worker}, generation 1, up \d+ s, \d+ connection\(s\) open, \d+ served",
        lines[5],
    ), lines


def test_status_with_another_pidfile_path(run_tend, tmp_path):
    """--pidfile names the pidfile, before or after the action."""
    (tmp_path / "run").mkdir()
    tend = run_tend("--nodaemon", "--pidfile", "run/poetry.pid", "poetry", *LOCAL)
    tend.wait_for_port()
    wait_until((tmp_path / "run" / "poetry.pid").exists)

    after = tendctl("status", "--pidfile", "run/poetry.pid", cwd=tmp_path)
    before = tendctl("--pidfile", "run/poetry.pid", "status", cwd=tmp_path)

    assert after.returncode == before.returncode == 0
    assert f"pid {tend.pid}" in after.stdout
    # The same report, but for what may change between the two: the uptimes, and the
    # counts a worker's next heartbeat brings.
    changing = r"up \d+ s|\d+ connection\(s\) open|\d+ served"
    assert re.sub(changing, "", after.stdout) == re.sub(changing, "", before.stdout)


def test_status_of_a_stale_pidfile_naming_a_live_pid_is_1(
    tmp_path: Path, bystander: subprocess.Popen[str]
) -> None:
    """A pidfile nobody holds is stale even when its pid is alive (reused): exit 1."""
    pidfile = tmp_path / "tend.pid"
    pidfile.write_text(f"{bystander.pid}\n")

    result = tendctl("status", cwd=tmp_path)

    assert result.returncode == 1
    assert result.stdout == (
        f"tend is not running, but its pidfile {pidfile} remains: it names pid "
        f"{bystander.pid}, and no process holds its lock (stale)\n"
    )


def test_status_of_an_unreadable_pidfile_is_4(tmp_path: Path) -> None:
    """A pidfile that holds no pid: status unknown, exit 4, one line on stderr."""
    (tmp_path / "tend.pid").write_text("hello\n")
    result = tendctl("status", cwd=tmp_path)
    assert result.returncode == 4
    assert result.stderr == (
        f"tendctl: pidfile '{tmp_path / 'tend.pid'}' holds something other than a process id; "
        "remove it if no server uses it\n"
    )


def test_status_lists_unix_sockets(run_tend, tmp_path):
    """A UNIX listener shows as its path."""
    path = tmp_path / "p.sock"
    if len(str(path)) > 100:
        pytest.skip("tmp_path is too long for a UNIX socket path")
    tend = run_tend("--nodaemon", "--pidfile", "tend.pid", "poetry", "--port", f"unix:{path}")
    tend.wait_for_output(r"starting on ")
    # The supervisor also listens on its control socket, tend.ctl beside the pidfile (made
    # while the worker starts).
    expected = [str(tmp_path / "tend.ctl"), str(path)]
    wait_until(lambda: listening_addresses(tend.pid) == expected)
    status = tendctl("status", cwd=tmp_path)
    assert f"listening on: {path}\n" in status.stdout


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0 s"), (42, "42 s"), (185, "3 min 05 s"), (7620, "2 h 07 min"), (273600, "3 days 4 h")],
)
def test_durations_read_as_a_person_would_say_them(seconds: float, text: str) -> None:
    """Uptime is written in the two largest units."""
    assert describe_duration(seconds) == text


# stop


def test_stop_waits_until_a_detached_tend_is_gone(tmp_path: Path, daemons: list[int]) -> None:
    """stop returns once the daemon has exited and removed its pidfile: exit 0."""
    launched = subprocess.run(
        [*TEND, "poetry", *LOCAL], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert launched.returncode == 0, launched.stderr
    pid = int((tmp_path / "tend.pid").read_text())
    daemons.append(pid)

    result = tendctl("stop", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tend (pid {pid}) stopped\n"
    assert not pid_alive(pid)
    assert not (tmp_path / "tend.pid").exists()
    assert "Server Shut Down." in (tmp_path / "tend.log").read_text()


def test_stop_without_a_pidfile_succeeds(tmp_path: Path) -> None:
    """Stopping what is not running is not an error (LSB): exit 0."""
    result = tendctl("stop", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == f"tend is not running (no pidfile {tmp_path / 'tend.pid'})\n"


def test_stop_never_signals_the_pid_of_a_stale_pidfile(
    tmp_path: Path, bystander: subprocess.Popen[str]
) -> None:
    """The pid of a pidfile nobody holds belongs to someone else now: it is left alone."""
    (tmp_path / "tend.pid").write_text(f"{bystander.pid}\n")

    stopped = tendctl("stop", cwd=tmp_path)
    reopened = tendctl("reopen-logs", cwd=tmp_path)

    assert stopped.returncode == 0
    assert "was not signalled" in stopped.stdout
    assert reopened.returncode == 7
    assert reopened.stderr == (
        f"tendctl: cannot reopen the logs: tend is not running "
        f"(pidfile {tmp_path / 'tend.pid'} is stale)\n"
    )
    assert pending_signals(bystander.pid) == 0
    assert bystander.poll() is None


def test_stop_refuses_a_pid_that_does_not_hold_the_locked_pidfile(
    tmp_path: Path, bystander: subprocess.Popen[str]
) -> None:
    """A locked pidfile whose pid is not the holder (another pid namespace, say): refused."""
    pidfile = tmp_path / "tend.pid"
    pidfile.write_text(f"{bystander.pid}\n")
    holder = os.open(pidfile, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        result = tendctl("stop", cwd=tmp_path)
    finally:
        os.close(holder)

    assert result.returncode == 1
    assert result.stderr == (
        f"tendctl: not signalling pid {bystander.pid}: it does not hold the locked pidfile "
        f"{quote(str(pidfile))} (another pid namespace, such as a container?)\n"
    )
    assert pending_signals(bystander.pid) == 0


def test_stop_gives_up_after_the_timeout(run_tend, tmp_path):
    """A tend still stopping when --timeout passes: exit 1, one line, still running."""
    (tmp_path / "app.py").write_text(STUBBORN_APP)
    tend, _ = start_with_pidfile(run_tend, "--shutdown-timeout", "60", "-y", "app.py")

    result = tendctl("stop", "--timeout", "0.5", cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr == (
        f"tendctl: tend (pid {tend.pid}) is still running 0.5 s after SIGTERM; "
        "wait longer with --timeout, or add --kill\n"
    )
    assert not tend.exited
    tend.wait_for_output("Received SIGTERM, shutting down.")
    assert (tmp_path / "tend.pid").exists()


def test_stop_with_kill_kills_and_removes_the_pidfile(run_tend, tmp_path):
    """--kill: still running after --timeout, tend is killed and its pidfile removed."""
    (tmp_path / "app.py").write_text(STUBBORN_APP)
    tend, _ = start_with_pidfile(run_tend, "--shutdown-timeout", "60", "-y", "app.py")

    result = tendctl("stop", "--timeout", "0.5", "--kill", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"tend (pid {tend.pid}) did not stop within 0.5 s of SIGTERM; killed it with SIGKILL "
        f"and removed its pidfile {tmp_path / 'tend.pid'}\n"
    )
    assert tend.wait() == -signal.SIGKILL
    assert not (tmp_path / "tend.pid").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_stop_with_kill_takes_the_workers_along(run_tend, tmp_path):
    """Killing a supervisor (-u nobody) kills its worker too, not only the supervisor."""
    (tmp_path / "app.py").write_text(STUBBORN_APP)
    tend, _ = start_with_pidfile(
        run_tend, "-u", "nobody", "--shutdown-timeout", "60", "-y", "app.py"
    )
    workers = [
        int(pid) for pid in Path(f"/proc/{tend.pid}/task/{tend.pid}/children").read_text().split()
    ]
    assert workers

    result = tendctl("stop", "--timeout", "0.5", "--kill", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert tend.wait() == -signal.SIGKILL
    for worker in workers:
        wait_until(lambda worker=worker: not pid_alive(worker))


def test_bad_timeout_is_a_usage_error(tmp_path: Path) -> None:
    """--timeout takes seconds, 0 or more; anything else is argparse's exit 2."""
    result = tendctl("stop", "--timeout", "-1", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid duration '-1'" in result.stderr


# reopen-logs


def test_reopen_logs_makes_tend_open_a_new_log_file(run_tend, tmp_path):
    """Move tend.log away, run reopen-logs: tend writes to a new tend.log."""
    log = tmp_path / "tend.log"
    tend = run_tend(
        "--nodaemon", "--pidfile", "tend.pid", "--logfile", "tend.log", "poetry", *LOCAL
    )
    tend.wait_for_port(source=str(log))
    wait_until((tmp_path / "tend.pid").exists)
    log.rename(tmp_path / "tend.log.1")

    result = tendctl("reopen-logs", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"asked tend (pid {tend.pid}) to reopen its log file\n"
    wait_until(log.exists)
    assert tend.stop() == 0
    assert "Server Shut Down." in log.read_text()
    assert "Server Shut Down." not in (tmp_path / "tend.log.1").read_text()


def test_reopen_logs_without_tend_is_7(tmp_path: Path) -> None:
    """Nothing to signal: one line on stderr, LSB's 7 (not running)."""
    result = tendctl("reopen-logs", cwd=tmp_path)
    assert result.returncode == 7
    assert result.stderr == (
        f"tendctl: cannot reopen the logs: tend is not running "
        f"(no pidfile {tmp_path / 'tend.pid'})\n"
    )


def test_status_into_a_closed_pipe_says_nothing_more(run_tend, tmp_path):
    """`tendctl status | head -1`: the reader has gone; no traceback follows, exit 1."""
    tend = run_tend("--nodaemon", "--pidfile", "tend.pid", "poetry", *LOCAL)
    tend.wait_for_port()
    wait_until((tmp_path / "tend.ctl").exists)
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        done = subprocess.run(
            [*TENDCTL, "status"], cwd=tmp_path, stdout=write_end, stderr=subprocess.PIPE,
            text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (1, "")
