"""`--workers N`: one supervisor, N workers on the same sockets, a dead worker replaced."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import POEM, TEND, fetch, pid_alive, wait_until, workers_ready

LOCAL = ["--port", "0", "--iface", "127.0.0.1"]


def children(pid: int) -> list[int]:
    """The live pids whose parent is *pid*."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split() if pid_alive(int(child))]


def writes(pid: int) -> int:
    """How many write-type system calls *pid* has made (syscw in /proc/PID/io)."""
    with open(f"/proc/{pid}/io") as file:
        for line in file:
            if line.startswith("syscw:"):
                return int(line.split()[1])
    raise AssertionError(f"no syscw in /proc/{pid}/io")


def test_two_workers_serve_and_a_killed_one_is_replaced(run_tend, tmp_path):
    """Kill one of two workers: fetches still succeed, and a new worker takes its place."""
    tend = run_tend("--nodaemon", "--workers", "2", "poetry", *LOCAL)
    port = tend.wait_for_port()
    first, second = workers_ready(tend, 2)
    assert set(children(tend.pid)) == {first, second}
    assert (tmp_path / "tend.pid").read_text().strip() == str(tend.pid)
    for _ in range(20):
        assert fetch(port) == POEM.read_bytes()
    os.kill(first, signal.SIGKILL)
    assert fetch(port) == POEM.read_bytes()
    tend.wait_for_output(
        rf"worker 1 \(pid {first}\) exited with signal SIGKILL; starting a new one"
    )
    replacement = wait_until(lambda: [pid for pid in children(tend.pid) if pid != second])
    assert isinstance(replacement, list)
    assert replacement[0] != first
    wait_until(lambda: tend.stdout.count("starting on") == 3)
    for _ in range(20):
        assert fetch(port) == POEM.read_bytes()
    assert tend.stop(signal.SIGTERM) == 0
    assert "Received SIGTERM, stopping 2 worker(s)." in tend.stdout
    assert tend.stdout.count("Main loop terminated.") == 2
    assert tend.stdout.rstrip().endswith("Server Shut Down.")
    assert not (tmp_path / "tend.pid").exists()
    assert not pid_alive(second)
    assert not pid_alive(replacement[0])


def test_both_workers_take_connections(run_tend, tmp_path):
    """Each worker has its own event loop on the shared socket; both serve."""
    tend = run_tend("--nodaemon", "--workers", "2", "--loop", "uvloop", "poetry", *LOCAL)
    port = tend.wait_for_port()
    wait_until(lambda: tend.stdout.count("starting on") == 2)
    workers = set(children(tend.pid))
    assert len(workers) == 2
    # The log line does not say which worker served; the kernel counts each process's
    # write calls (sending a poem is one), and an idle worker makes none.
    before = {pid: writes(pid) for pid in workers}

    def both_served() -> bool:
        fetch(port)
        return all(writes(pid) > before[pid] for pid in workers)

    wait_until(both_served, timeout=20, interval=0)
    assert tend.stop() == 0


def test_a_worker_failing_to_start_fails_the_whole_start(tmp_path):
    """If a worker cannot start, the others are stopped and the one line is printed; exit 1."""
    # A name no other test uses, so that pgrep finds this run's processes only.
    missing = f"missing-{os.getpid()}-{tmp_path.name}.txt"
    result = subprocess.run(
        [*TEND, "--workers", "2", "poetry", "--poem", missing, *LOCAL],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("tend: cannot read poem file")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "tend.pid").exists()
    leftover = subprocess.run(["pgrep", "-f", missing], capture_output=True, text=True)
    assert leftover.stdout == ""


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_worker_count_is_a_usage_error(tmp_path, value):
    """--workers takes a number >= 1 or auto."""
    result = subprocess.run(
        [*TEND, "--workers", value, "poetry"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "argument --workers" in result.stderr


def test_auto_starts_one_worker_per_cpu(run_tend, tmp_path):
    """--workers auto starts as many workers as there are CPUs."""
    tend = run_tend("--nodaemon", "--workers", "auto", "poetry", *LOCAL)
    tend.wait_for_port()
    count = os.cpu_count() or 1
    wait_until(lambda: tend.stdout.count("starting on") == count)
    assert len(children(tend.pid)) == count
    assert tend.stop() == 0


def test_workers_stop_when_the_supervisor_is_killed(run_tend, tmp_path):
    """A supervisor killed outright takes its workers with it: none serves on orphaned."""
    tend = run_tend("--nodaemon", "--workers", "2", "poetry", *LOCAL)
    tend.wait_for_port()
    wait_until(lambda: tend.stdout.count("starting on") == 2)
    workers = children(tend.pid)
    assert len(workers) == 2
    tend.process.send_signal(signal.SIGKILL)
    tend.wait()
    wait_until(lambda: not any(pid_alive(pid) for pid in workers))


def listening_sockets(port: int) -> list[str]:
    """Inodes of the TCP sockets listening on *port*, from /proc/net/tcp."""
    inodes = []
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            if local_port == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.append(fields[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets *pid* holds open."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def test_each_tcp_worker_accepts_on_its_own_reuseport_socket(run_tend):
    """TCP listeners are bound once per worker with SO_REUSEPORT; each worker holds its own."""
    tend = run_tend("--nodaemon", "--pidfile", "", "--workers", "2", "poetry", *LOCAL)
    port = tend.wait_for_port()
    wait_until(lambda: tend.stdout.count("starting on") == 2)
    sockets = listening_sockets(port)
    assert len(sockets) == 2
    first, second = (socket_inodes(pid) & set(sockets) for pid in children(tend.pid))
    assert len(first) == len(second) == 1
    assert first != second
    assert set(sockets) <= socket_inodes(tend.pid)  # the supervisor keeps both for restarts
    assert tend.stop() == 0


def test_unix_listeners_are_shared_by_the_workers(run_tend, tmp_path):
    """A UNIX socket cannot be bound twice: every worker accepts on the one socket."""
    path = tmp_path / "poetry.sock"
    tend = run_tend(
        "--nodaemon", "--pidfile", "", "--workers", "2", "poetry", "--port", f"unix:{path}"
    )
    wait_until(lambda: tend.stdout.count("starting on") == 2)
    first, second = (socket_inodes(pid) for pid in children(tend.pid))
    assert first & second  # the same listening socket in both
    assert tend.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_another_server_holds_is_refused_whatever_the_worker_count(
    tmp_path: Path, workers: str
) -> None:
    """Per-worker copies use SO_REUSEPORT, which would let them share a port with another
    server of the same user (here one that set SO_REUSEPORT itself): tend refuses it, as
    with one worker, and leaves nothing behind."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [*TEND, "--nodaemon", "--pidfile", "tend.pid", "--workers", workers, "poetry",
             "--port", f"tcp:{port}:interface=127.0.0.1"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == f"tend: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert not (tmp_path / "tend.pid").exists()


STRACE = ["strace", "-qq", "-o", "/dev/null", "-e", "trace=clone,clone3,fork"]


def fork_fails(when: int) -> list[str]:
    """strace, tracing the supervisor alone, failing its *when*-th fork with EAGAIN (a pids
    cgroup or RLIMIT_NPROC at its limit)."""
    return [*STRACE, "-e", f"inject=clone,clone3,fork:error=EAGAIN:when={when}", "--"]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (make test installs it)")
def test_a_worker_that_cannot_be_forked_at_start_fails_the_start(run_tend, tmp_path):
    """The second worker's fork fails: one line, exit 1, no pidfile, worker 1 stopped."""
    tend = run_tend("--nodaemon", "--workers", "2", "poetry", *LOCAL, wrapper=fork_fails(2))
    assert tend.wait() == 1
    assert tend.stderr == "tend: cannot start worker 2: Resource temporarily unavailable\n"
    assert not (tmp_path / "tend.pid").exists()


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (make test installs it)")
def test_a_worker_that_cannot_be_forked_later_is_tried_again(run_tend, tmp_path):
    """Serving, a dead worker's replacement cannot be forked: the supervisor says so, tries
    again after the back-off, and serves on; it does not end."""
    tend = run_tend("--nodaemon", "--workers", "2", "poetry", *LOCAL, wrapper=fork_fails(3))
    port = tend.wait_for_port()
    first = int(tend.wait_for_output(r"started worker 1 \(pid (\d+)\)").group(1))
    assert first in workers_ready(tend, 2)
    supervisor = int(wait_until(lambda: (tmp_path / "tend.pid").read_text().strip()))
    os.kill(first, signal.SIGKILL)
    tend.wait_for_output(
        r"cannot start worker 1: Resource temporarily unavailable; trying again in [\d.]+ s"
    )
    tend.wait_for_output(rf"started worker 1 \(pid (?!{first}\))\d+\)")
    for _ in range(10):
        assert fetch(port) == POEM.read_bytes()
    os.kill(supervisor, signal.SIGTERM)
    assert tend.wait() == 0
