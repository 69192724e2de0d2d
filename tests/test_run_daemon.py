"""`tend` detached, as the seed's "A Real Daemon" walks through: pidfile, log, signals."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import POEM, TEND, fetch, pid_alive, wait_until

LOCAL = ["--port", "0", "--iface", "127.0.0.1"]


def start(*args: str, cwd: Path, daemons: list[int]) -> subprocess.CompletedProcess[str]:
    """Run the launcher to completion; note the daemon's pid for clean-up."""
    result = subprocess.run(
        [*TEND, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    pidfile = _pidfile_in(args, cwd)
    if pidfile is not None and pidfile.exists():
        daemons.append(int(pidfile.read_text()))
    return result


def _pidfile_in(args: tuple[str, ...], cwd: Path) -> Path | None:
    if "--pidfile" in args:
        value = args[args.index("--pidfile") + 1]
        return (cwd / value) if value else None
    rundir = Path(args[args.index("--rundir") + 1]) if "--rundir" in args else cwd
    return rundir / "tend.pid"


def port_in(log: Path) -> int:
    """The port the daemon logged it is serving on."""
    import re

    match = re.search(r"starting on (\d+)", log.read_text())
    assert match, log.read_text()
    return int(match.group(1))


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name."""
    with open(f"/proc/{pid}/stat") as file:
        return file.read().rsplit(")", 1)[1].split()


def test_detaches_serves_and_stops_cleanly(tmp_path, daemons):
    """The launcher returns once the daemon serves; kill $(cat tend.pid) stops it cleanly."""
    result = start("poetry", *LOCAL, cwd=tmp_path, daemons=daemons)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""
    pid = int((tmp_path / "tend.pid").read_text())
    # No sleep needed: the port is served the moment the launcher returns.
    assert fetch(port_in(tmp_path / "tend.log")) == POEM.read_bytes()
    fields = stat_fields(pid)
    session, tty = int(fields[3]), int(fields[4])
    assert tty == 0, "the daemon has a controlling terminal"
    assert session != os.getsid(0), "the daemon is in the test's session"
    assert session != pid, "the daemon leads a session, so it could acquire a terminal"
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid))
    assert not (tmp_path / "tend.pid").exists()
    log = (tmp_path / "tend.log").read_text()
    for line in ("Received SIGTERM, shutting down.", "Main loop terminated.", "Server Shut Down."):
        assert line in log
    assert "sending 2807 bytes of poetry to 127.0.0.1:" in log


def test_daemon_files_are_private_by_default(tmp_path, daemons):
    """Detached, the umask is 0077: the log is readable by its owner only."""
    result = start("poetry", *LOCAL, cwd=tmp_path, daemons=daemons)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tend.log").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "tend.pid").stat().st_mode & 0o777 == 0o644
    os.kill(daemons[-1], signal.SIGTERM)
    wait_until(lambda: not pid_alive(daemons[-1]))


def test_rundir_and_umask_options(tmp_path, daemons):
    """--rundir holds the default pidfile and log; --umask sets the files' modes."""
    rundir = tmp_path / "run"
    rundir.mkdir()
    result = start(
        "--rundir", str(rundir), "--umask", "022", "poetry", *LOCAL, cwd=tmp_path, daemons=daemons
    )
    assert result.returncode == 0, result.stderr
    pid = daemons[-1]
    assert os.readlink(f"/proc/{pid}/cwd") == str(rundir)
    assert (rundir / "tend.log").stat().st_mode & 0o777 == 0o644
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid))
    assert not (rundir / "tend.pid").exists()


def test_second_start_is_refused_while_the_first_runs(tmp_path, daemons):
    """A live server's pidfile refuses a second start, naming its pid; the first keeps serving."""
    assert start("poetry", *LOCAL, cwd=tmp_path, daemons=daemons).returncode == 0
    pid = daemons[-1]
    second = start("poetry", *LOCAL, cwd=tmp_path, daemons=[])
    assert second.returncode == 1
    assert second.stderr.strip() == (
        f"tend: Another tend server is running, PID {pid} (pidfile {tmp_path / 'tend.pid'})"
    )
    assert (tmp_path / "tend.pid").read_text().strip() == str(pid)
    assert fetch(port_in(tmp_path / "tend.log")) == POEM.read_bytes()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid))


def test_stale_pidfile_is_replaced(tmp_path, daemons):
    """A pidfile naming a live but unrelated process (pid reuse) does not block a start."""
    (tmp_path / "tend.pid").write_text(f"{os.getpid()}\n")  # alive, but holds no lock
    result = start("poetry", *LOCAL, cwd=tmp_path, daemons=daemons)
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "tend.pid").read_text())
    assert pid != os.getpid()
    assert f"Removing stale pidfile {tmp_path / 'tend.pid'}" in (tmp_path / "tend.log").read_text()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("garbage", "holds something other than a process id"),
        ("secret", "holds something other than a process id"),
        ("directory", "it is a directory, not a regular file"),
        ("fifo", "it is a FIFO, not a regular file"),
        ("device", "it is a device, not a regular file"),
        ("symlink", "it is a symbolic link; give the real path"),
    ],
)
def test_unusable_pidfile_is_a_clear_error(tmp_path, daemons, setup, message):
    """A pidfile holding text, or something other than a file in its place, is one line,
    no daemon, and the thing in its place untouched (a device is never replaced, a FIFO
    never waited on, and what a non-pidfile holds is never printed)."""
    pidfile = tmp_path / "tend.pid"
    victim = tmp_path / "victim"
    victim.write_text("root:$6$secret-hash:19000::::::\n")
    if setup == "garbage":
        pidfile.write_text("garbage\n")
    elif setup == "secret":
        pidfile.write_text(victim.read_text())
    elif setup == "directory":
        pidfile.mkdir()
    elif setup == "fifo":
        os.mkfifo(pidfile)
    elif setup == "device":
        if os.geteuid() != 0:
            pytest.skip("needs root to make a device node")
        os.mknod(pidfile, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # as /dev/null
    else:
        pidfile.symlink_to(victim)
    before = os.lstat(pidfile)
    result = subprocess.run(
        [*TEND, "poetry", *LOCAL], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "secret" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    after = os.lstat(pidfile)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (
        before.st_ino,
        before.st_mode,
        before.st_rdev,
    )
    assert victim.read_text() == "root:$6$secret-hash:19000::::::\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["poetry", "--poem", "missing.txt", *LOCAL], "cannot read poem file"),
        (["-y", "missing.py"], "cannot read app file"),
        (["-u", "no-such-user-here", "poetry", *LOCAL], "no such user"),
        (["-l", "-", "poetry", *LOCAL], "cannot log to standard output when detached"),
        (["-l", "/no/such/dir/tend.log", "poetry", *LOCAL], "cannot open log file"),
    ],
)
def test_failed_start_reports_to_the_launcher_and_leaves_nothing(tmp_path, args, message):
    """Any failure before ready: the launcher prints the line, exits 1, no pidfile or daemon."""
    result = subprocess.run(
        [*TEND, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "tend.pid").exists()
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftover.stdout == ""


def test_busy_port_reported_by_the_launcher(tmp_path):
    """A daemon that cannot bind makes its launcher say so and exit 1."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [*TEND, "poetry", "--port", str(port), "--iface", "127.0.0.1"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert (
        result.stderr.strip() == f"tend: cannot listen on 127.0.0.1:{port}: address already in use"
    )
    assert not (tmp_path / "tend.pid").exists()


def test_log_rotates_under_volume_without_losing_a_line(tmp_path, daemons):
    """Rotation at --log-max-bytes keeps every line whole and every file under the limit."""
    result = start("--log-max-bytes", "4000", "poetry", *LOCAL, cwd=tmp_path, daemons=daemons)
    assert result.returncode == 0, result.stderr
    port = port_in(tmp_path / "tend.log")
    fetches = 300
    for _ in range(fetches):
        assert len(fetch(port)) == POEM.stat().st_size
    pid = daemons[-1]
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid))
    files = sorted(tmp_path.glob("tend.log*"))
    assert len(files) > 5
    lines = []
    for path in files:
        data = path.read_bytes()
        assert len(data) <= 4000, path
        assert data.endswith(b"\n")
        lines.extend(data.decode().splitlines())
    assert sum("sending 2807 bytes of poetry" in line for line in lines) == fetches
    assert all(line[:2] == "20" for line in lines)


def test_sigusr1_reopens_the_log_after_a_move(tmp_path, daemons):
    """logrotate-style: move the log, send SIGUSR1, new lines go to a new tend.log."""
    assert start("poetry", *LOCAL, cwd=tmp_path, daemons=daemons).returncode == 0
    pid = daemons[-1]
    port = port_in(tmp_path / "tend.log")
    (tmp_path / "tend.log").rename(tmp_path / "tend.log.old")
    os.kill(pid, signal.SIGUSR1)
    wait_until(lambda: (tmp_path / "tend.log").exists())
    fetch(port)
    wait_until(lambda: "sending" in (tmp_path / "tend.log").read_text())
    assert "sending" not in (tmp_path / "tend.log.old").read_text()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid))


@pytest.mark.parametrize("closed", [0, 1])
def test_a_detached_start_with_a_standard_stream_closed_serves(tmp_path, daemons, closed):
    """`tend poetry <&-` (or `>&-`): the daemon starts and serves as with the stream open."""
    result = subprocess.run(
        ["bash", "-c", f'exec "$@" {closed}>&-', "bash", *TEND, "poetry", *LOCAL],
        cwd=tmp_path,
        capture_output=closed != 1,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "tend.pid").read_text())
    daemons.append(pid)
    assert fetch(port_in(tmp_path / "tend.log")) == POEM.read_bytes()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid))
    assert not (tmp_path / "tend.pid").exists()


def test_of_two_starts_that_both_find_no_pidfile_only_one_takes_it(tmp_path: Path) -> None:
    """The second start looked before the first wrote and found no file; the first then
    takes the pidfile. The second must not take it too (it would delete the winner's file
    when it failed to bind): it is told a live tend holds it, and the file stays."""
    from tend.pidfile import Pidfile, PidfileLockedError

    path = tmp_path / "tend.pid"
    first, second = Pidfile(str(path)), Pidfile(str(path))
    look = second._open_locked_existing
    looks: list[int | None] = []

    def look_then_lose() -> int | None:
        found = look()
        if not looks:
            first.acquire(pid=111)  # the other start wins between the look and the write
        looks.append(found)
        return found

    second._open_locked_existing = look_then_lose  # type: ignore[method-assign]
    with pytest.raises(PidfileLockedError, match="PID 111"):
        second.acquire(pid=222)
    assert looks[0] is None
    assert path.read_text() == "111\n"
    assert not list(tmp_path.glob(".tend.pid.*.tmp"))
    second.release()
    assert path.read_text() == "111\n"
    first.release()
    assert not path.exists()
