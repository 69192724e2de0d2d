"""Dropping privileges: bind as root, serve as nobody, and still clean up as root."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import POEM, TEND, fetch, pid_alive, wait_until

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
NOBODY = pwd.getpwnam("nobody")


def nogroup() -> str:
    """Debian calls nobody's group nogroup; others call it nobody."""
    import grp

    return grp.getgrgid(NOBODY.pw_gid).gr_name


def status_ids(pid: int) -> tuple[list[str], list[str], list[str]]:
    """The Uid, Gid and Groups lines of /proc/PID/status."""
    fields: dict[str, list[str]] = {}
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return fields["Uid"], fields["Gid"], fields["Groups"]


def children(pid: int) -> list[int]:
    """The pids whose parent is *pid*."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def free_low_port() -> int:
    """A port below 1024 that nothing listens on here."""
    for port in range(600, 1000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def launch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TEND, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_root
def test_serves_a_root_only_port_as_nobody_and_cleans_up_a_root_only_rundir(tmp_path):
    """`tend -u nobody poetry --port LOW`: binds as root, serves as nobody, removes the pidfile."""
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)  # like /run: only root may create or remove files here
    port = free_low_port()
    result = launch(
        "-u",
        "nobody",
        "--rundir",
        str(rundir),
        "poetry",
        "--port",
        str(port),
        "--iface",
        "127.0.0.1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    supervisor = int((rundir / "tend.pid").read_text())
    try:
        (worker,) = children(supervisor)
        uids, gids, groups = status_ids(worker)
        assert uids == [str(NOBODY.pw_uid)] * 4
        assert gids == [str(NOBODY.pw_gid)] * 4
        assert groups == [str(NOBODY.pw_gid)]
        assert status_ids(supervisor)[0][0] == "0"
        assert fetch(port) == POEM.read_bytes()
        assert f"as nobody:{nogroup()}" in (rundir / "tend.log").read_text()
        wait_until(lambda: "sending 2807 bytes of poetry" in (rundir / "tend.log").read_text())
    finally:
        os.kill(supervisor, signal.SIGTERM)
    wait_until(lambda: not pid_alive(supervisor))
    assert not pid_alive(worker)
    assert not (rundir / "tend.pid").exists()
    assert "Server Shut Down." in (rundir / "tend.log").read_text()


@needs_root
def test_log_keeps_rotating_after_the_drop(tmp_path):
    """The supervisor writes the workers' lines, so rotation works in a root-only folder."""
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    result = launch(
        "-u", "nobody", "-g", nogroup(), "--rundir", str(rundir), "--log-max-bytes", "3000",
        "poetry", "--port", "0", "--iface", "127.0.0.1", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    supervisor = int((rundir / "tend.pid").read_text())
    try:
        port = int(wait_until(lambda: _port(rundir / "tend.log")))  # type: ignore[arg-type]
        for _ in range(100):
            fetch(port)
        wait_until(lambda: _count_sent(rundir) == 100)
        assert len(list(rundir.glob("tend.log.*"))) >= 3
        assert all(path.stat().st_size <= 3000 for path in rundir.glob("tend.log*"))
        # SIGUSR1 goes to the supervisor, which owns the file.
        (rundir / "tend.log").rename(rundir / "moved.log")
        os.kill(supervisor, signal.SIGUSR1)
        wait_until(lambda: (rundir / "tend.log").exists())
    finally:
        os.kill(supervisor, signal.SIGTERM)
    wait_until(lambda: not pid_alive(supervisor))
    assert not (rundir / "tend.pid").exists()


def _port(log: Path) -> int | None:
    import re

    match = re.search(r"starting on (\d+)", log.read_text()) if log.exists() else None
    return int(match.group(1)) if match else None


def _count_sent(rundir: Path) -> int:
    """Lines sent, over the log and its rotated files; -1 if a rotation moved one meanwhile."""
    try:
        return sum(
            path.read_text().count("sending 2807 bytes of poetry") for path in rundir.glob("*.log*")
        )
    except FileNotFoundError:
        return -1


@needs_root
def test_app_file_names_the_user_and_the_command_line_wins(run_tend, tmp_path):
    """Application(uid=, gid=) drops privileges; --uid on the command line overrides it."""
    app = tmp_path / "app.py"
    app.write_text(
        "import tend\n"
        "from tend.poetry.server import PoetryFactory, PoetryService\n"
        f"poetry = PoetryService({str(POEM)!r})\n"
        "application = tend.Application('poetry', uid='nobody', gid='nogroup')\n"
        "poetry.set_service_parent(application)\n"
        "server = tend.TCPServer(0, PoetryFactory(poetry), interface='127.0.0.1')\n"
        "server.set_service_parent(application)\n"
    )
    tend = run_tend("--nodaemon", "--pidfile", "", "-y", str(app))
    port = tend.wait_for_port()
    (worker,) = children(tend.pid)
    assert status_ids(worker)[0][0] == str(NOBODY.pw_uid)
    assert fetch(port) == POEM.read_bytes()
    assert tend.stop() == 0
    overridden = run_tend("--nodaemon", "--pidfile", "", "-u", "root", "-g", "root", "-y", str(app))
    overridden.wait_for_port()
    (worker,) = children(overridden.pid)
    assert status_ids(worker)[0][0] == "0"  # the command line's root wins over the app file
    assert overridden.stop() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-u", "no-such-user-x"], "tend: cannot switch to user 'no-such-user-x': no such user"),
        (
            ["-g", "no-such-group-x"],
            "tend: cannot switch to group 'no-such-group-x': no such group",
        ),
    ],
)
def test_unknown_user_or_group_is_a_start_up_error(tmp_path, args, message):
    """An unknown user or group is named in one line; exit 1; nothing is left."""
    result = launch(
        "--nodaemon", *args, "poetry", "--port", "0", "--iface", "127.0.0.1", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.strip() == message
    assert not (tmp_path / "tend.pid").exists()


def test_switching_user_when_not_root_is_refused(tmp_path):
    """Asking for --uid without root is a clear error, not a silent no-op."""
    if os.geteuid() == 0:
        # Run tend itself as nobody, if nobody can run this interpreter at all.
        probe = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *TEND, "--version"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode != 0:
            pytest.skip(f"nobody cannot run this Python ({probe.stderr.strip()[:80]})")
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        cwd = Path("/tmp")
    else:
        prefix, cwd = [], tmp_path
    result = subprocess.run(
        [*prefix, *TEND, "--nodaemon", "--pidfile", "", "-u", "root", "poetry", "--port", "0"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot switch user or group: only root can" in result.stderr


@needs_root
def test_chroot_serves_from_inside_and_still_removes_the_pidfile(run_tend, tmp_path):
    """--chroot: files read at start come from inside; the pidfile outside is still removed."""
    jail = tmp_path / "jail"
    jail.mkdir()
    (jail / "poem.txt").write_bytes(POEM.read_bytes())
    tend = run_tend("--nodaemon", "--chroot", str(jail), "poetry", "--poem", "/poem.txt",
                    "--port", "0", "--iface", "127.0.0.1")  # fmt: skip
    port = tend.wait_for_port()
    assert os.readlink(f"/proc/{tend.pid}/root") == str(jail)
    assert fetch(port) == POEM.read_bytes()
    assert (tmp_path / "tend.pid").exists()
    assert tend.stop() == 0
    assert not (tmp_path / "tend.pid").exists()


def test_missing_chroot_is_a_clear_error(tmp_path):
    """A chroot folder that does not exist: one line, exit 1, no pidfile left."""
    result = launch("--nodaemon", "--chroot", str(tmp_path / "nope"), "poetry", "--port", "0",
                    "--iface", "127.0.0.1", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"tend: cannot chroot to {tmp_path / 'nope'}: No such file or directory"
    )
    assert not (tmp_path / "tend.pid").exists()


@needs_root
def test_no_descriptor_of_a_jailed_worker_leads_out_of_the_jail(run_tend, tmp_path):
    """--chroot with -u nobody: the worker holds sockets and pipes, never a folder or file
    outside the jail (the log's folder, the pidfile's, a socket file's)."""
    jail = tmp_path / "jail"
    jail.mkdir()
    (jail / "poem.txt").write_bytes(POEM.read_bytes())
    tend = run_tend(
        "--nodaemon",
        "--chroot", str(jail),
        "-u", "nobody",
        "-l", str(tmp_path / "tend.log"),
        "poetry", "--poem", "/poem.txt",
        "--port", f"unix:{tmp_path / 'poetry.sock'}",
    )  # fmt: skip
    tend.wait_for_output(r"starting on", source=str(tmp_path / "tend.log"))
    (worker,) = children(tend.pid)
    assert os.readlink(f"/proc/{worker}/root") == str(jail)
    leads = {}
    for fd in os.listdir(f"/proc/{worker}/fd"):
        target = os.readlink(f"/proc/{worker}/fd/{fd}")
        if target.startswith("/") and not (target + "/").startswith(f"{jail}/"):
            leads[fd] = target
    # Outside the jail, only the standard streams may name paths (/dev/null, the test's
    # output files), and none of them a folder.
    assert set(leads) <= {"0", "1", "2"}, leads
    for target in leads.values():
        assert not os.path.isdir(target), leads
    assert tend.stop() == 0
    assert not (tmp_path / "poetry.sock").exists()


@needs_root
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-u", "4294967295"], "invalid id '4294967295'"),
        (["-u", "4294967296"], "invalid id '4294967296'"),
        (["-g", "99999999999999999999"], "invalid id '99999999999999999999'"),
        (["-g", "4294967295"], "invalid id '4294967295'"),
        (["-u", "\u0661"], "invalid id '\u0661'"),
    ],
)
def test_an_id_that_is_not_one_is_a_usage_error(tmp_path, args, message):
    """An id past 2**32-2 (4294967295 is -1: 'leave unchanged'), or not ASCII digits: exit 2."""
    result = launch(*args, "poetry", "--port", "0", "--iface", "127.0.0.1", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "tend.pid").exists()


@needs_root
def test_a_uid_without_a_passwd_entry_needs_a_group(tmp_path):
    """-u 123456 alone would keep gid 0: refused, with the way out in the line."""
    result = launch("-u", "123456", "poetry", "--port", "0", "--iface", "127.0.0.1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "tend: cannot switch to user 123456: it has no passwd entry, so no group of its own; "
        "give the group too (--gid)\n"
    )


@needs_root
def test_a_uid_without_an_entry_runs_with_the_group_given(run_tend, tmp_path):
    """-u 123456 -g 123456: every id of the worker changes, and it holds no capability."""
    tend = run_tend("--nodaemon", "--pidfile=", "-u", "123456", "-g", "123456", "poetry",
                    "--port", "0", "--iface", "127.0.0.1")  # fmt: skip
    tend.wait_for_port()
    (worker,) = children(tend.pid)
    uids, gids, groups = status_ids(worker)
    assert uids == ["123456"] * 4
    assert gids == ["123456"] * 4
    assert groups == ["123456"]
    status = Path(f"/proc/{worker}/status").read_text()
    for field in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert f"{field}:\t0000000000000000" in status
    assert tend.stop() == 0


@needs_root
def test_a_supervisor_without_cap_kill_stops_its_workers_on_their_channel(run_tend, tmp_path):
    """Without CAP_KILL (a unit's capability set), root may not signal a worker running as
    nobody: the stop says so in one line and still drains and exits 0, without a traceback."""
    tend = run_tend(
        "--nodaemon",
        "--pidfile",
        "",
        "-u",
        "nobody",
        "poetry",
        "--port",
        "0",
        "--iface",
        "127.0.0.1",
        wrapper=["setpriv", "--bounding-set", "-kill", "--inh-caps", "-kill", "--"],
    )
    port = tend.wait_for_port()
    assert fetch(port) == POEM.read_bytes()
    assert tend.stop() == 0
    output = tend.stdout
    assert "cannot signal worker 1 (pid " in output
    assert "signalling workers that run as another user needs CAP_KILL" in output
    assert "Received STOP from the supervisor, shutting down." in output
    assert "Traceback" not in output


@needs_root
def test_without_cap_kill_a_stop_still_ends_a_worker_that_does_not_listen(run_tend, tmp_path):
    """A worker as nobody, stopped (SIGSTOP), under a root supervisor that may not signal
    it: the stop cannot kill it, so the supervisor exits, within the shutdown timeout and
    the kill's grace, rather than wait for ever."""
    tend = run_tend(
        "--nodaemon", "--pidfile", "", "-u", "nobody", "--shutdown-timeout", "1",
        "poetry", "--port", "0", "--iface", "127.0.0.1",
        wrapper=["setpriv", "--bounding-set", "-kill", "--inh-caps", "-kill", "--"],
    )  # fmt: skip
    assert tend.wait_ready()  # a worker stopped while starting is the start timeout's
    (worker,) = children(tend.pid)
    os.kill(worker, signal.SIGSTOP)  # the test holds CAP_KILL
    assert tend.stop(timeout=30) == 1
    assert "cannot kill 1 worker(s) that did not stop; exiting" in tend.stdout
    # Left to the service manager, which would kill it; here the test, which may, wakes it
    # instead: it hears its channel hang up and stops by itself.
    os.kill(worker, signal.SIGCONT)
    wait_until(lambda: not pid_alive(worker))
