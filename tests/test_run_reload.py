"""Reload and upgrade under a steady load: no fetch fails, the new poem is served."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TENDCTL, Tend, fetch, pid_alive, wait_until


def tendctl(*args: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TENDCTL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def refused(port: int) -> bool:
    """Whether a connection to *port* on 127.0.0.1 is refused (nothing listens there)."""
    try:
        fetch(port)
    except ConnectionRefusedError:
        return True
    return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Load:
    """Fetches from *port* in a loop on a thread; counts the whole poems and the failures."""

    def __init__(self, port: int, poems: Callable[[], set[bytes]]) -> None:
        self.port = port
        self.poems = poems  # what a whole poem may be right now
        self.fetched = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                poem = fetch(self.port, timeout=10)
            except OSError as error:
                self.failures.append(f"{type(error).__name__}: {error}")
                continue
            if poem not in self.poems():
                self.failures.append(f"a poem that is no poem: {poem[:40]!r}")
            self.fetched += 1

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(30)
        self.seconds = time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.fetched / self.seconds


def deployment(folder: Path, ports: list[int], poem: Path) -> Path:
    """A deployment file serving *poem* on each port, in the foreground with a pidfile."""
    text = '[tend]\nnodaemon = true\npidfile = "tend.pid"\nworkers = 2\n'
    for number, port in enumerate(ports, start=1):
        text += (
            f'\n[[service]]\nplugin = "poetry"\nname = "p{number}"\nport = {port}\n'
            f'iface = "127.0.0.1"\npoem = "{poem}"\n'
        )
    path = folder / "deploy.toml"
    path.write_text(text)
    return path


def supervisor_fds_and_threads(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def test_twenty_reloads_and_five_upgrades_under_load_fail_no_fetch(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """A client fetching all along sees no refused, reset or short fetch through 20 reloads
    (a new poem, then a port added or removed, in turn) and 5 upgrades; after each reload
    the new poem is served; the supervisor's descriptors and threads stay as they were."""
    poem = tmp_path / "poem.txt"
    poem.write_text("poem 0\n")
    steady, extra = free_port(), free_port()
    deploy = deployment(tmp_path, [steady], poem)
    current = {b"poem 0\n"}
    tend = run_tend("-c", str(deploy))
    tend.wait_for_output(r"starting on \d+")
    wait_until(lambda: (tmp_path / "tend.pid").exists() and (tmp_path / "tend.ctl").exists())
    supervisor = int((tmp_path / "tend.pid").read_text())
    after_first: tuple[int, int] | None = None
    with Load(steady, lambda: current) as load:
        for number in range(1, 21):
            if number % 2:
                text = f"poem {number}\n".encode()
                poem.write_bytes(text)
                current = current | {text}  # the old generation may still answer meanwhile
            else:
                ports = [steady, extra] if number % 4 == 2 else [steady]
                deployment(tmp_path, ports, poem)
            result = tendctl("reload", cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith(f"reloaded: generation {number + 1} serving")
            if number % 2:
                # The load takes any whole poem. An old worker accepts until it has heard
                # its SIGTERM and closed its listeners, which may come a moment after the
                # reload's answer on a loaded machine; then only the new poem is served.
                wait_until(lambda text=text: fetch(steady) == text)
            if number % 4 == 2:
                assert fetch(extra) == text  # only the new generation listens there
            elif number % 4 == 0:
                wait_until(lambda: refused(extra))
            if number == 1:
                after_first = supervisor_fds_and_threads(supervisor)
        fds_threads = supervisor_fds_and_threads(supervisor)
        for _ in range(5):
            result = tendctl("upgrade", cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith("upgraded: pid ")
            new = int(result.stdout.split()[2])
            assert int((tmp_path / "tend.pid").read_text()) == new
            wait_until(lambda supervisor=supervisor: not pid_alive(supervisor))
            supervisor = new
    assert load.failures == []
    assert load.fetched > 0
    assert load.rate >= 200, f"{load.rate:.0f} fetches/s: the load was too light to prove it"
    assert after_first is not None
    assert abs(fds_threads[0] - after_first[0]) <= 2
    assert abs(fds_threads[1] - after_first[1]) <= 2
    os.kill(supervisor, signal.SIGTERM)
    wait_until(lambda: not (tmp_path / "tend.pid").exists())


BAD_RELOADS = {
    "a TOML syntax error": ("deploy", "[[service]\n", "line 4: TOML syntax error"),
    "an unknown plugin": ("deploy", '[[service]]\nplugin = "petry"\n', "unknown plugin 'petry'"),
    "a bad option": (
        "deploy",
        '[[service]]\nplugin = "poetry"\nport = "tcp:abc"\n',
        "option 'port': invalid endpoint 'tcp:abc'",
    ),
    "a port in use": ("deploy", '[[service]]\nplugin = "poetry"\nport = @BUSY@\n', "in use"),
    "a start_service that raises": ("app", "raise", "RuntimeError: refuses to start"),
    "a start_service that never ends": ("app", "hang", "did not finish starting within 2 s"),
}

APP = """
import asyncio, tend
from tend.poetry.server import PoetryFactory, PoetryService

class Odd(tend.Service):
    async def start_service(self):
        if {how!r} == "raise":
            raise RuntimeError("refuses to start")
        if {how!r} == "hang":
            await asyncio.Event().wait()
        if {how!r} == "block":  # deaf to everything, its loop included
            import time
            time.sleep(3600)
        await super().start_service()

application = tend.Application("odd")
poetry = PoetryService({poem!r})
poetry.set_service_parent(application)
tend.TCPServer({port}, PoetryFactory(poetry), interface="127.0.0.1").set_service_parent(
    application
)
Odd("odd").set_service_parent(application)
"""


@pytest.mark.parametrize("case", BAD_RELOADS)
def test_a_bad_reload_changes_nothing(run_tend: Callable[..., Tend], tmp_path: Path, case: str):
    """Whatever is wrong with the new tree, the old one serves on with no failed fetch,
    the log has one line saying why, and tendctl reload exits 1 with that same line."""
    kind, broken, reason = BAD_RELOADS[case]
    poem = tmp_path / "poem.txt"
    poem.write_text("the old poem\n")
    port = free_port()
    if kind == "deploy":
        source = deployment(tmp_path, [port], poem)
        tend = run_tend("-c", str(source))
    else:
        source = tmp_path / "app.py"
        source.write_text(APP.format(how="", poem=str(poem), port=port))
        tend = run_tend("--nodaemon", "--pidfile", "tend.pid", "--start-timeout", "2",
                        "-y", str(source))  # fmt: skip
    tend.wait_for_output(r"starting on \d+")
    wait_until((tmp_path / "tend.ctl").exists)
    busy = socket.socket()
    with busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        if kind == "deploy":
            busy_port = str(busy.getsockname()[1])
            text = '[tend]\nnodaemon = true\npidfile = "tend.pid"\n' + broken
            source.write_text(text.replace("@BUSY@", busy_port))
        else:
            source.write_text(APP.format(how=broken, poem=str(poem), port=port))
        with Load(port, lambda: {b"the old poem\n"}) as load:
            result = tendctl("reload", cwd=tmp_path)
    assert result.returncode == 1
    line = result.stderr.removeprefix("tendctl: ")
    assert line.startswith("reload failed: ")
    assert reason in line
    assert line.count("\n") == 1
    assert f"[-] {line}" in tend.stdout
    assert load.failures == []
    assert fetch(port) == b"the old poem\n"
    assert tend.stop() == 0


def test_the_pidfile_always_names_a_live_supervisor_through_upgrades(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """Polled all along, the pidfile names a live tend holding its lock; a UNIX socket
    keeps serving across each upgrade and its file is never missing."""
    socket_path = tmp_path / "p.sock"
    tend = run_tend("--nodaemon", "--pidfile", "tend.pid", "poetry", "--port",
                    f"unix:{socket_path}")  # fmt: skip
    tend.wait_for_output(r"starting on ")
    wait_until((tmp_path / "tend.ctl").exists)
    problems: list[str] = []
    stopping = threading.Event()

    def watch() -> None:
        while not stopping.is_set():
            try:
                pid = int((tmp_path / "tend.pid").read_text())
            except (OSError, ValueError) as error:
                problems.append(f"pidfile: {error}")
                continue
            if not pid_alive(pid):
                problems.append(f"pidfile names pid {pid}, which is gone")
            if not socket_path.exists():
                problems.append("the socket file is missing")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for _ in range(3):
            result = tendctl("upgrade", cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(socket_path))
                assert client.recv(65536)
    finally:
        stopping.set()
        watcher.join(10)
    assert problems == []
    supervisor = int((tmp_path / "tend.pid").read_text())
    os.kill(supervisor, signal.SIGTERM)
    wait_until(lambda: not socket_path.exists() and not (tmp_path / "tend.pid").exists())


def test_an_upgrade_to_a_program_that_fails_keeps_the_old_one(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """The new program fails at start (its app file no longer loads): the old serves on."""
    app = tmp_path / "app.py"
    poem = tmp_path / "poem.txt"
    poem.write_text("still here\n")
    port = free_port()
    app.write_text(APP.format(how="", poem=str(poem), port=port))
    tend = run_tend("--nodaemon", "--pidfile", "tend.pid", "-y", str(app))
    tend.wait_for_output(r"starting on \d+")
    wait_until((tmp_path / "tend.ctl").exists)
    app.write_text("raise SystemExit('no')\n")
    missing: list[str] = []
    done = threading.Event()

    def watch() -> None:  # the paths must name a live tend at every moment
        while not done.is_set():
            for name in ("tend.pid", "tend.ctl"):
                if not (tmp_path / name).exists():
                    missing.append(name)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = tendctl("upgrade", cwd=tmp_path)
    finally:
        done.set()
        watcher.join()
    assert result.returncode == 1
    assert result.stderr.startswith("tendctl: upgrade failed: ")
    assert fetch(port) == b"still here\n"
    assert int((tmp_path / "tend.pid").read_text()) == tend.pid
    assert not missing
    assert tendctl("status", cwd=tmp_path).returncode == 0
    assert tend.stop() == 0


def test_an_upgrade_failing_after_it_took_the_pidfile_gives_it_back(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """The new program loads, takes the pidfile and the control socket, then its worker
    fails: the old tend has both again, and tendctl still reaches it."""
    app = tmp_path / "app.py"
    poem = tmp_path / "poem.txt"
    poem.write_text("still here\n")
    port = free_port()
    app.write_text(APP.format(how="", poem=str(poem), port=port))
    tend = run_tend("--nodaemon", "--pidfile", "tend.pid", "-y", str(app))
    tend.wait_for_output(r"starting on \d+")
    wait_until((tmp_path / "tend.ctl").exists)
    app.write_text(APP.format(how="raise", poem=str(poem), port=port))
    result = tendctl("upgrade", cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    assert "refuses to start" in result.stderr
    assert fetch(port) == b"still here\n"
    assert int((tmp_path / "tend.pid").read_text()) == tend.pid
    status = tendctl("status", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert f"pid {tend.pid}" in status.stdout
    assert tend.stop() == 0
    assert not (tmp_path / "tend.pid").exists()
    assert not (tmp_path / "tend.ctl").exists()


def test_a_stop_during_a_reload_ends_the_run(run_tend: Callable[..., Tend], tmp_path: Path) -> None:
    """SIGTERM while a reload's worker is still starting, blocked for good: both generations
    stop, the blocked one killed after the grace, and tend exits, its pidfile gone."""
    app = tmp_path / "app.py"
    poem = tmp_path / "poem.txt"
    poem.write_text("a poem\n")
    port = free_port()
    app.write_text(APP.format(how="", poem=str(poem), port=port))
    tend = run_tend("--nodaemon", "--pidfile", "tend.pid", "--shutdown-timeout", "1",
                    "--start-timeout", "60", "-y", str(app))  # fmt: skip
    tend.wait_for_output(r"starting on \d+")
    app.write_text(APP.format(how="block", poem=str(poem), port=port))
    os.kill(tend.pid, signal.SIGHUP)
    started = tend.wait_for_output(r"started worker 1 \(pid (\d+)\), generation 2")
    blocked = int(started.group(1))
    wait_until(lambda: "sleep" in Path(f"/proc/{blocked}/wchan").read_text())  # it is blocked
    assert tend.stop(timeout=30) in (0, 1)
    assert "Server Shut Down." in tend.stdout
    assert not (tmp_path / "tend.pid").exists()


def test_sigusr2_upgrades(run_tend: Callable[..., Tend], tmp_path: Path) -> None:
    """SIGUSR2 itself, as `kill -USR2` sends it: a new supervisor serves, the pidfile
    names it, and the old one has gone."""
    port = free_port()
    tend = run_tend("--nodaemon", "--pidfile", "tend.pid", "poetry", "--port",
                    f"tcp:{port}:interface=127.0.0.1")  # fmt: skip
    tend.wait_for_output(r"starting on \d+")
    wait_until((tmp_path / "tend.ctl").exists)
    os.kill(tend.pid, signal.SIGUSR2)
    assert tend.wait() == 0  # the old one drains and exits once the new one serves

    def successor() -> int | None:
        pid = int((tmp_path / "tend.pid").read_text())
        return pid if pid != tend.pid and pid_alive(pid) else None

    new = wait_until(successor)
    assert fetch(port) != b""
    # Forked with the stop signals blocked, it must not run with them blocked for good.
    status = Path(f"/proc/{new}/status").read_text()
    assert "SigBlk:\t0000000000000000\n" in status
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: not (tmp_path / "tend.pid").exists())


def test_an_upgrade_follows_a_current_symlink_to_the_new_release(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """Started in `current`, a symlink to release 1 (as deployment tools make it); the link
    moves to release 2; the upgrade's new program runs release 2's app file and poem."""
    port = free_port()
    for number in (1, 2):
        release = tmp_path / f"release{number}"
        release.mkdir()
        (release / "poem.txt").write_text(f"the poem of release {number}\n")
        (release / "app.py").write_text(APP.format(how="", poem="poem.txt", port=port))
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "release1")
    environment = {**os.environ, "PWD": str(current)}
    pidfile = str(tmp_path / "tend.pid")
    tend = run_tend("--nodaemon", "--pidfile", pidfile, "-y", "app.py", cwd=current,
                    env=environment)  # fmt: skip
    tend.wait_for_output(r"starting on \d+")
    assert fetch(port) == b"the poem of release 1\n"
    (tmp_path / "next").symlink_to(tmp_path / "release2")
    os.replace(tmp_path / "next", current)
    result = tendctl("upgrade", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert tend.wait() == 0
    new = int((tmp_path / "tend.pid").read_text())
    try:
        assert fetch(port) == b"the poem of release 2\n"
    finally:
        os.kill(new, signal.SIGTERM)
    wait_until(lambda: not (tmp_path / "tend.pid").exists())


@pytest.fixture
def notify_receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(30)
    yield path, receiver
    receiver.close()


def test_systemd_hears_reloading_then_ready_and_the_new_main_pid(
    run_tend: Callable[..., Tend], tmp_path: Path, notify_receiver: tuple[str, socket.socket]
) -> None:
    """Type=notify-reload: RELOADING=1 with MONOTONIC_USEC, then READY=1; an upgrade names
    the new supervisor with MAINPID=."""
    path, receiver = notify_receiver
    env = {**os.environ, "NOTIFY_SOCKET": path}
    tend = run_tend("--nodaemon", "--pidfile", "tend.pid", "poetry", "--port",
                    "tcp:0:interface=127.0.0.1", env=env)  # fmt: skip

    def next_message() -> str:
        return receiver.recv(4096).decode()

    while "READY=1" not in (message := next_message()):
        pass
    before = time.monotonic_ns() // 1000
    os.kill(tend.pid, signal.SIGHUP)
    while "RELOADING=1" not in (message := next_message()):
        pass
    fields = dict(line.split("=", 1) for line in message.splitlines())
    assert before <= int(fields["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    while "READY=1" not in (message := next_message()):
        pass
    assert "STATUS=serving PoetryFactory on 127.0.0.1:" in message
    result = tendctl("upgrade", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    new = int(result.stdout.split()[2])
    while f"MAINPID={new}" not in (message := next_message()):
        pass
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: not (tmp_path / "tend.pid").exists())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_the_control_socket_answers_no_other_user(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """tend.ctl is mode 0600; and even opened to all, a peer of another uid is refused."""
    # A folder nobody can reach (pytest's own are 0700): the check is the socket's.
    folder = Path(tempfile.mkdtemp(prefix="tend-ctl-"))
    folder.chmod(0o755)
    tend = run_tend("--nodaemon", "--pidfile", str(folder / "tend.pid"), "poetry", "--port",
                    "tcp:0:interface=127.0.0.1")  # fmt: skip
    tend.wait_for_port()
    control = folder / "tend.ctl"
    wait_until(control.exists)
    assert control.stat().st_mode & 0o777 == 0o600
    nobody = pwd.getpwnam("nobody")
    client = textwrap.dedent(
        f"""
        import socket
        with socket.socket(socket.AF_UNIX) as client:
            try:
                client.connect({str(control)!r})
            except PermissionError:
                print("permission denied")
            else:
                client.sendall(b'{{"command": "stop"}}\\n')
                print(client.recv(4096).decode().strip())
        """
    )

    def as_nobody() -> str:
        return subprocess.run(
            ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
             "--clear-groups", "/usr/bin/python3", "-c", client],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip

    assert as_nobody() == "permission denied"
    control.chmod(0o666)
    answer = as_nobody()
    assert f"uid {nobody.pw_uid} may not control tend" in answer
    assert not tend.exited  # the stop it asked for was refused
    with contextlib.suppress(OSError):
        assert fetch(tend.wait_for_port()) != b""
    assert tend.stop() == 0
    shutil.rmtree(folder)


# The poem file is named for the process that builds the tree: a reload's trial build
# (in a child) writes its own, so what is served is what the supervisor's build wrote.
DEV_APP = """
import os
import pathlib
import tend
import helper
from tend.poetry.server import PoetryFactory, PoetryService

poem = pathlib.Path(__file__).with_name(f"poem-{{os.getpid()}}.txt")
poem.write_text(helper.TEXT)
application = tend.Application("dev")
poetry = PoetryService(str(poem))
poetry.set_service_parent(application)
tend.TCPServer({port}, PoetryFactory(poetry), interface="127.0.0.1").set_service_parent(
    application
)
"""


def test_reload_flag_reloads_when_a_module_changes_and_after_a_broken_one_is_fixed(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """--reload: a change to a module beside the app file reloads with the new code; a
    syntax error there is one line and the old tree serves on; fixing it reloads again."""
    port = free_port()
    (tmp_path / "helper.py").write_text('TEXT = "first\\n"\n')
    (tmp_path / "app.py").write_text(DEV_APP.format(port=port))
    environment = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    tend = run_tend("--nodaemon", "--pidfile", "", "--reload", "-y", "app.py", env=environment)
    tend.wait_for_output(r"Watching \d+ file\(s\)")
    wait_until(lambda: fetch(port) == b"first\n")
    (tmp_path / "helper.py").write_text('TEXT = "second, longer\\n"\n')
    tend.wait_for_output(r"Changed: '.*helper\.py'")
    wait_until(lambda: fetch(port) == b"second, longer\n")
    (tmp_path / "helper.py").write_text('TEXT = "third\n')  # a syntax error
    tend.wait_for_output(r"reload failed: .*helper\.py.*")
    assert fetch(port) == b"second, longer\n"
    (tmp_path / "helper.py").write_text('TEXT = "fourth, fixed\\n"\n')
    tend.wait_for_output(r"reloaded: generation 3")
    wait_until(lambda: fetch(port) == b"fourth, fixed\n")
    assert tend.stop() == 0


# Held at start while a file named "gate" exists: a generation that starts slowly.
GATE = """
import asyncio

class Gate(tend.Service):
    async def start_service(self):
        while os.path.exists("gate"):
            await asyncio.sleep(0.02)
        if os.path.exists("fail"):
            raise RuntimeError("refuses to start")
        await super().start_service()

Gate("gate").set_service_parent(application)
"""


def start_gated(
    run_tend: Callable[..., Tend], tmp_path: Path, *runner: str, shut: bool
) -> tuple[Tend, int]:
    """tend (with *runner*'s options) on DEV_APP behind GATE, and its port. If *shut*, the
    gate is shut from the start, so its first worker stays starting (until the test
    removes "gate"); if not, tend is ready, and the gate can be shut for a reload's."""
    port = free_port()
    (tmp_path / "helper.py").write_text('TEXT = "first\\n"\n')
    (tmp_path / "app.py").write_text(DEV_APP.format(port=port) + GATE)
    if shut:
        (tmp_path / "gate").touch()
    environment = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    tend = run_tend("--nodaemon", *runner, "-y", "app.py", env=environment)
    if shut:
        tend.wait_for_output(r"starting on \d+")
    else:  # a worker serves before its Gate starts: a gate shut then would hold it
        assert tend.wait_ready()
    return tend, port


def change_at_the_gate(tend: Tend, port: int, module: Path, text: str) -> None:
    """With generation 2 held at the gate, set *module*'s TEXT to *text*, open the gate:
    generation 2 serves, then the change makes generation 3, which serves *text*."""
    wait_until(lambda: tend.stdout.count("starting on") == 2)
    module.write_text(f"TEXT = {text + chr(10)!r}\n")
    (module.parent / "gate").unlink()
    tend.wait_for_output(r"reloaded: generation 2")
    tend.wait_for_output(rf"Changed: '.*{module.stem}\.py'")
    tend.wait_for_output(r"reloaded: generation 3")
    wait_until(lambda: fetch(port) == f"{text}\n".encode())
    assert tend.stop() == 0


@pytest.mark.parametrize("how", ["SIGHUP", "tendctl reload", "SIGUSR2", "tendctl upgrade"])
def test_a_reload_or_upgrade_asked_for_while_tend_starts_follows_the_start(
    run_tend: Callable[..., Tend], tmp_path: Path, how: str
) -> None:
    """A reload or an upgrade asked for while the first workers are still starting is held,
    not refused: once tend is ready it happens, and tendctl, which waited, says so."""
    tend, port = start_gated(run_tend, tmp_path, "--pidfile", "tend.pid", shut=True)
    wait_until((tmp_path / "tend.ctl").exists)
    upgrade = "upgrade" in how or how == "SIGUSR2"
    asked = None
    if how.startswith("SIG"):
        os.kill(tend.pid, signal.Signals[how])
    else:
        asked = subprocess.Popen(
            [*TENDCTL, how.split()[1]], cwd=tmp_path, stdout=subprocess.PIPE, text=True
        )
    (tmp_path / "helper.py").write_text('TEXT = "second\\n"\n')
    tend.wait_for_output(f"while tend is starting: it {'upgrades' if upgrade else 'reloads'}")
    assert asked is None or asked.poll() is None  # waiting for the outcome
    (tmp_path / "gate").unlink()
    if asked is not None:
        said, _ = asked.communicate(timeout=60)
        assert asked.returncode == 0
        assert said.startswith("upgraded: pid" if upgrade else "reloaded:"), said
    if upgrade:
        assert tend.wait() == 0  # the old supervisor drains and exits; its successor serves
        successor = int((tmp_path / "tend.pid").read_text())
        assert successor != tend.pid
        assert fetch(port) == b"second\n"
        os.kill(successor, signal.SIGTERM)
        wait_until(lambda: not pid_alive(successor))
    else:
        tend.wait_for_output(r"reloaded: generation 2")
        wait_until(lambda: fetch(port) == b"second\n")
        assert "cannot reload" not in tend.stdout
        assert tend.stop() == 0


@pytest.mark.parametrize("end", ["a stop", "a failed start"])
def test_the_end_of_a_start_answers_a_held_reload(
    run_tend: Callable[..., Tend], tmp_path: Path, end: str
) -> None:
    """tendctl reload waits while tend starts; a stop, or a failure, then ends the start,
    and tendctl is told in one line why the reload will not happen (exit 1), not left
    waiting."""
    tend, _ = start_gated(run_tend, tmp_path, "--pidfile", "tend.pid", shut=True)
    wait_until((tmp_path / "tend.ctl").exists)
    with subprocess.Popen(
        [*TENDCTL, "reload"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    ) as asked:
        tend.wait_for_output("while tend is starting: it reloads once ready")
        if end == "a stop":
            assert tend.stop(when_ready=False) == 1
        else:
            (tmp_path / "fail").touch()
            (tmp_path / "gate").unlink()
            assert tend.wait() == 1
        _, said = asked.communicate(timeout=60)
    assert asked.returncode == 1
    assert said == (
        "tendctl: tend stopped before the reload was done\n"
        if end == "a stop"
        else "tendctl: tend failed to start: a service failed to start: RuntimeError: "
        "refuses to start (the traceback is in the log)\n"
    )


def test_reload_flag_sees_a_change_made_while_a_reload_was_under_way(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """--reload: helper.py changes again while the reload its first change began is still
    starting its workers (held at a gate): once that reload is done, the second change
    reloads too, and the newest text is served; the reload does not swallow it."""
    tend, port = start_gated(run_tend, tmp_path, "--pidfile", "", "--reload", shut=False)
    assert fetch(port) == b"first\n"
    (tmp_path / "gate").touch()
    (tmp_path / "helper.py").write_text('TEXT = "second, longer\\n"\n')
    tend.wait_for_output(r"Changed: '.*helper\.py'")
    change_at_the_gate(tend, port, tmp_path / "helper.py", "third")


def test_reload_flag_sees_a_change_made_while_tend_was_starting(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """--reload: helper.py changes while tend's first workers are still starting (a reload
    would be refused then): once tend is ready, the change reloads; it is not lost."""
    tend, port = start_gated(run_tend, tmp_path, "--pidfile", "", "--reload", shut=True)
    (tmp_path / "helper.py").write_text('TEXT = "second, longer\\n"\n')
    # Let the watcher look at least twice while the start is held (a look is due every
    # second): the old code saw the change then, was refused, and forgot it.
    edited = time.monotonic()
    wait_until(lambda: time.monotonic() - edited > 2.5, timeout=5)
    (tmp_path / "gate").unlink()
    assert tend.wait_ready()
    tend.wait_for_output(r"Changed: '.*helper\.py'")
    tend.wait_for_output(r"reloaded: generation 2")
    wait_until(lambda: fetch(port) == b"second, longer\n")
    assert "cannot reload" not in tend.stdout
    assert tend.stop() == 0


def test_reload_flag_sees_a_change_to_a_new_module_made_while_its_workers_start(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """--reload: a reload brings in helper2, and helper2.py changes while that reload's
    workers are still starting: once the reload is done, the change reloads again."""
    (tmp_path / "helper2.py").write_text('TEXT = "from helper2\\n"\n')
    tend, port = start_gated(run_tend, tmp_path, "--pidfile", "", "--reload", shut=False)
    assert fetch(port) == b"first\n"
    (tmp_path / "gate").touch()
    (tmp_path / "app.py").write_text(DEV_APP.format(port=port).replace("helper", "helper2") + GATE)
    change_at_the_gate(tend, port, tmp_path / "helper2.py", "helper2, changed")


def test_reload_flag_watches_a_module_the_reload_brought_in(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """--reload: app.py now imports helper2; after that reload, a change to helper2.py
    reloads too (its files are read once the new tree is built, not before)."""
    port = free_port()
    (tmp_path / "helper.py").write_text('TEXT = "first\\n"\n')
    (tmp_path / "helper2.py").write_text('TEXT = "from helper2\\n"\n')
    (tmp_path / "app.py").write_text(DEV_APP.format(port=port))
    environment = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    tend = run_tend("--nodaemon", "--pidfile", "", "--reload", "-y", "app.py", env=environment)
    tend.wait_for_output(r"Watching \d+ file\(s\)")
    wait_until(lambda: fetch(port) == b"first\n")
    (tmp_path / "app.py").write_text(DEV_APP.format(port=port).replace("helper", "helper2"))
    tend.wait_for_output(r"reloaded: generation 2")
    wait_until(lambda: fetch(port) == b"from helper2\n")
    (tmp_path / "helper2.py").write_text('TEXT = "helper2, changed\\n"\n')
    tend.wait_for_output(r"Changed: '.*helper2\.py'")
    tend.wait_for_output(r"reloaded: generation 3")
    wait_until(lambda: fetch(port) == b"helper2, changed\n")
    assert tend.stop() == 0


@pytest.mark.parametrize(
    ("request_bytes", "answer"),
    [
        (b"status\n", "not a tendctl request"),
        (b'{"command": "restart"}\n', "unknown command 'restart'"),
        (b"x" * 5000, "the request is too long"),
        (b'{"command": "status", "x": ' + b"[" * 3000 + b"\n", "not a tendctl request"),
        (b'{"command": ["status"]}\n', "not a tendctl request"),
        (b'{"command": {}}\n', "not a tendctl request"),
    ],
    ids=["not-json", "unknown", "too-long", "nested-3000", "a-list", "a-dict"],
)
def test_a_bad_control_request_is_answered_and_tend_goes_on(
    run_tend: Callable[..., Tend], tmp_path: Path, request_bytes: bytes, answer: str
) -> None:
    """A request tend cannot take gets its one-line answer; the next ones work as ever."""
    tend = run_tend("--nodaemon", "--pidfile", "tend.pid", "poetry", "--port",
                    "tcp:0:interface=127.0.0.1")  # fmt: skip
    tend.wait_for_port()
    wait_until((tmp_path / "tend.ctl").exists)
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(tmp_path / "tend.ctl"))
        client.sendall(request_bytes)
        assert answer in client.recv(4096).decode()
    for _ in range(3):
        status = tendctl("status", cwd=tmp_path)
        assert status.returncode == 0, status.stderr
    assert not tend.exited
    assert "Traceback" not in tend.stdout
    assert tend.stop() == 0


def start_then_change(
    run_tend: Callable[..., Tend],
    tmp_path: Path,
    app_text: str,
    flag: str,
    poem_text: str = "a poem\n",
    runner: tuple[str, ...] = (),
) -> tuple[Tend, int]:
    """tend serving the app file *app_text* (formatted with the poem's path and a port),
    then *flag* created beside it, which the app reads to change from now on; and the port."""
    poem = tmp_path / "poem.txt"
    poem.write_text(poem_text)
    port = free_port()
    (tmp_path / "app.py").write_text(app_text.format(poem=str(poem), port=port))
    tend = run_tend("--nodaemon", "--pidfile", "tend.pid", *runner, "-y", str(tmp_path / "app.py"))
    tend.wait_for_output(r"starting on \d+")
    wait_until((tmp_path / "tend.ctl").exists)
    (tmp_path / flag).touch()
    return tend, port


def start_then_slow(
    run_tend: Callable[..., Tend], tmp_path: Path, seconds: float
) -> tuple[Tend, int]:
    """tend serving an app file whose trees built from now on take *seconds* to start, and
    its port."""
    slow = APP.format(how="", poem="{poem}", port="{port}").replace(
        "await super().start_service()",
        f"if __import__('os').path.exists('slow'): await asyncio.sleep({seconds})\n"
        "        await super().start_service()",
    )
    return start_then_change(run_tend, tmp_path, slow, "slow")


def test_a_long_reload_is_waited_for_without_spinning(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """tendctl reload waits 6 s for a slow new tree: the supervisor sleeps meanwhile (its CPU
    time grows by far less than the wait: a busy loop would take a whole second of it)."""
    tend, _ = start_then_slow(run_tend, tmp_path, 6)

    def cpu_ticks() -> int:
        fields = Path(f"/proc/{tend.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = cpu_ticks()
    result = tendctl("reload", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert cpu_ticks() - before < os.sysconf("SC_CLK_TCK")  # under a second of CPU
    assert tend.stop() == 0


def test_a_stop_during_an_upgrade_stops_both(run_tend: Callable[..., Tend], tmp_path: Path) -> None:
    """While the new program is still starting the pidfile names the old one: tendctl stop
    reaches it, the upgrade is called off, and neither tend is left."""
    tend, port = start_then_slow(run_tend, tmp_path, 30)
    upgrade = subprocess.Popen(
        [*TENDCTL, "upgrade"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        # The new program has started its worker, which now waits in its start.
        tend.wait_for_output(r"started worker 1 \(pid \d+\)(.|\n)*started worker 1 \(pid \d+\)")
        assert int((tmp_path / "tend.pid").read_text()) == tend.pid
        stop = tendctl("stop", cwd=tmp_path)
        assert stop.returncode == 0, stop.stderr
        assert f"pid {tend.pid}" in stop.stdout
        _, errors = upgrade.communicate(timeout=30)
    finally:
        upgrade.kill()
        upgrade.wait()
    assert upgrade.returncode == 1
    assert "upgrade failed: tend is stopping" in errors
    assert tend.wait(timeout=30) == 0
    assert not (tmp_path / "tend.pid").exists()
    assert not (tmp_path / "tend.ctl").exists()
    with pytest.raises(ConnectionRefusedError):  # nobody serves
        fetch(port)


FAKE_CONTROL = """
import json, socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen()
print("ready", flush=True)
while True:
    peer, _ = server.accept()
    try:
        peer.recv(4096)
        peer.sendall(json.dumps({"ok": True, "message": "reloaded: fake"}).encode() + b"\\n")
    except OSError:  # tend's check whether the socket is stale hangs up at once
        pass
    peer.close()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a planter as another user")
def test_tendctl_will_not_ask_a_control_socket_someone_else_planted(
    run_tend: Callable[..., Tend],
) -> None:
    """In a folder everyone may write to, nobody binds tend.ctl before tend starts: tendctl
    sees the socket is not tend's (SO_PEERCRED) and says so, instead of believing it."""
    folder = Path(tempfile.mkdtemp(prefix="tend-planted-"))
    folder.chmod(0o1777)
    nobody = pwd.getpwnam("nobody")
    planter = subprocess.Popen(
        ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
         "/usr/bin/python3", "-c", FAKE_CONTROL, str(folder / "tend.ctl")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert planter.stdout is not None
        assert planter.stdout.readline() == "ready\n"
        tend = run_tend("--nodaemon", "--pidfile", str(folder / "tend.pid"), "poetry",
                        "--port", "tcp:0:interface=127.0.0.1")  # fmt: skip
        tend.wait_for_port()
        wait_until((folder / "tend.pid").exists)
        result = tendctl("--pidfile", str(folder / "tend.pid"), "reload", cwd=folder)
        assert result.returncode != 0, tend.stdout
        assert "not asking the control socket" in result.stderr
        assert "neither root nor yours" in result.stderr
        assert "fake" not in result.stdout
        assert tend.stop() == 0
    finally:
        planter.kill()
        planter.communicate()
        shutil.rmtree(folder)


def test_a_reload_reads_relative_paths_from_where_tend_was_started(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """--rundir moves the daemon elsewhere; a reload parses the plugin's options again,
    and poem.txt is still the one beside where tend was started."""
    (tmp_path / "poem.txt").write_text("the poem beside\n")
    (tmp_path / "run").mkdir()
    port = free_port()
    tend = run_tend("--nodaemon", "--pidfile", "", "--rundir", "run", "poetry", "--poem",
                    "poem.txt", "--port", f"tcp:{port}:interface=127.0.0.1")  # fmt: skip
    tend.wait_for_output(r"starting on \d+")
    (tmp_path / "poem.txt").write_text("the poem beside, changed\n")
    os.kill(tend.pid, signal.SIGHUP)
    tend.wait_for_output(r"reloaded: generation 2")
    wait_until(lambda: fetch(port) == b"the poem beside, changed\n")
    assert tend.stop() == 0


def test_a_reload_reads_a_relative_app_file_from_where_tend_was_started(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """-y app.py with --rundir: the reload reads app.py beside where tend was started, not
    in the rundir."""
    poem = tmp_path / "poem.txt"
    poem.write_text("the first poem\n")
    (tmp_path / "run").mkdir()
    port = free_port()
    app = tmp_path / "app.py"
    app.write_text(APP.format(how="", poem=str(poem), port=port))
    tend = run_tend("--nodaemon", "--pidfile", "", "--rundir", "run", "-y", "app.py")
    tend.wait_for_output(r"starting on \d+")
    app.write_text(APP.format(how="", poem=str(poem), port=port).replace("odd", "even"))
    poem.write_text("the second poem\n")
    os.kill(tend.pid, signal.SIGHUP)
    tend.wait_for_output(r"reloaded: generation 2")
    wait_until(lambda: fetch(port) == b"the second poem\n")
    assert "reload failed" not in tend.stdout
    assert tend.stop() == 0


def test_a_reload_says_that_tend_table_changes_wait_for_a_restart(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """[tend] is read at start: a reload that finds it changed says which settings, in
    one warning line, and applies the services' changes."""
    port = free_port()
    deploy = tmp_path / "deploy.toml"
    service = f'[[service]]\nplugin = "poetry"\nport = "tcp:{port}:interface=127.0.0.1"\n'
    deploy.write_text("[tend]\nshutdown-timeout = 5\n\n" + service)
    tend = run_tend("--nodaemon", "--pidfile", "", "-c", str(deploy))
    tend.wait_for_output(r"starting on \d+")
    deploy.write_text("[tend]\nshutdown-timeout = 7\nworkers = 2\n\n" + service)
    os.kill(tend.pid, signal.SIGHUP)
    tend.wait_for_output(r"reloaded: generation 2")
    assert (
        "[tend] changed (shutdown-timeout, workers): the runner's settings take effect at "
        "the next start or upgrade, not in a reload" in tend.stdout
    )
    assert tend.stop() == 0


@pytest.mark.parametrize(
    "stray",
    [
        {"TEND_UPGRADE_CHANNEL": "1", "TEND_SOCKETS": "x"},
        {"TEND_UPGRADE_CHANNEL": "99", "TEND_SOCKETS": '[["tcp:0", [[1]]]]'},
        {"TEND_UPGRADE_CHANNEL": "0"},
        {"TEND_UPGRADE_CHANNEL": "2", "TEND_SOCKETS": "[]"},
        {"TEND_UPGRADE_CHANNEL": "9" * 30},
    ],
    ids=["stdout-garbage", "closed-fd", "stdin", "stderr", "huge"],
)
def test_stray_upgrade_variables_are_ignored(
    run_tend: Callable[..., Tend], stray: dict[str, str]
) -> None:
    """Upgrade variables copied from elsewhere are not a hand-over (the channel's peer is
    not tend's parent): tend starts as ever, with no traceback."""
    tend = run_tend("--nodaemon", "--pidfile", "", "poetry", "--port",
                    "tcp:0:interface=127.0.0.1", env={**os.environ, **stray})  # fmt: skip
    assert fetch(tend.wait_for_port()) != b""
    assert tend.stop() == 0
    assert "Traceback" not in tend.stdout + tend.stderr


def test_a_reload_asked_for_during_a_reload_follows_it(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """A second SIGHUP while a reload is under way is not dropped: another reload follows,
    so a file changed meanwhile is read too."""
    tend, port = start_then_slow(run_tend, tmp_path, 2)
    os.kill(tend.pid, signal.SIGHUP)
    tend.wait_for_output(r"Received SIGHUP, reloading")
    os.kill(tend.pid, signal.SIGHUP)
    tend.wait_for_output(r"another reload follows this one")
    tend.wait_for_output(r"reloaded: generation 2")
    tend.wait_for_output(r"reloaded: generation 3", timeout=30)
    assert fetch(port) == b"a poem\n"
    assert "cannot reload" not in tend.stdout
    assert tend.stop() == 0


BLOCKING_IMPORT = (
    "import os, time\n"
    "if os.path.exists('blocked'):\n"
    "    open('blocking', 'w').close()\n"
    "    time.sleep(3600)  # a database that does not answer, say\n"
)


def start_with_blocking_import(
    run_tend: Callable[..., Tend], tmp_path: Path, *runner: str
) -> tuple[Tend, int]:
    """tend on an app file that, from now on, blocks for an hour when it is imported."""
    blocking = BLOCKING_IMPORT + APP.format(how="", poem="{poem}", port="{port}")
    return start_then_change(run_tend, tmp_path, blocking, "blocked", "the old poem\n", runner)


def test_a_reload_held_behind_one_that_timed_out_begins_at_once(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """Two tendctl reloads; the first one's import blocks and is killed at --start-timeout;
    the second, held behind it, begins then and there (nothing else need wake the loop:
    no worker pings with --worker-timeout 0) and succeeds, the block being gone."""
    tend, port = start_with_blocking_import(
        run_tend, tmp_path, "--start-timeout", "2", "--worker-timeout", "0"
    )

    def ask() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*TENDCTL, "reload"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    with ask() as first:
        wait_until((tmp_path / "blocking").exists)  # its trial is stuck
        with ask() as second:
            tend.wait_for_output(r"another reload follows this one")
            (tmp_path / "blocked").unlink()
            _, said = first.communicate(timeout=30)
            assert first.returncode == 1
            assert "did not finish building within 2 s" in said
            said, _ = second.communicate(timeout=15)
            assert second.returncode == 0
            assert said.startswith("reloaded: generation 2")
    assert fetch(port) == b"the old poem\n"
    assert tend.stop() == 0


def test_many_waiting_tendctl_requests_are_bounded(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """While a reload is under way, each tendctl reload waits holding a descriptor of the
    supervisor's; past 64 waiting, more are refused at once in one line."""
    tend, _ = start_with_blocking_import(run_tend, tmp_path, "--start-timeout", "60")
    waiting = [
        subprocess.Popen(
            [*TENDCTL, "reload"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(64)
    ]
    try:
        wait_until(lambda: tend.stdout.count("Asked by tendctl") == 64, timeout=60)
        refused = tendctl("reload", cwd=tmp_path, timeout=30)
        assert refused.returncode == 1
        assert refused.stderr == "tendctl: cannot reload: 64 requests wait already\n"
    finally:
        for process in waiting:
            process.kill()
            process.wait()
    assert tend.stop() == 0


def test_a_reload_whose_import_blocks_fails_at_the_start_timeout(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """The new tree is tried in a child first: an import that blocks holds only the child,
    killed at --start-timeout; meanwhile the supervisor answers tendctl, and the old
    generation serves on."""
    tend, port = start_with_blocking_import(run_tend, tmp_path, "--start-timeout", "3")
    reload = subprocess.Popen(
        [*TENDCTL, "reload"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    tend.wait_for_output(r"reloading app file")
    status = tendctl("status", cwd=tmp_path, timeout=10)  # the supervisor is not blocked
    assert status.returncode == 0, status.stderr
    assert fetch(port) == b"the old poem\n"
    _, stderr = reload.communicate(timeout=30)
    assert reload.returncode == 1
    assert stderr == (
        f"tendctl: reload failed: app file {str(tmp_path / 'app.py')!r} did not finish "
        "building within 3 s (--start-timeout)\n"
    )
    assert fetch(port) == b"the old poem\n"
    (tmp_path / "blocked").unlink()
    assert tendctl("reload", cwd=tmp_path).returncode == 0
    assert tend.stop() == 0


def test_a_stop_during_a_blocked_trial_build_ends_at_once(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """SIGTERM while the new tree's import blocks (no start timeout at all): tend stops
    as ever, the trial child is killed, and nothing is left."""
    tend, _ = start_with_blocking_import(run_tend, tmp_path, "--start-timeout", "0")
    os.kill(tend.pid, signal.SIGHUP)
    tend.wait_for_output(r"reloading app file")

    def children() -> set[str] | None:  # the worker, and the trial build
        found = set(Path(f"/proc/{tend.pid}/task/{tend.pid}/children").read_text().split())
        return found if len(found) == 2 else None

    both = wait_until(children)
    assert tend.stop() == 0
    assert not (tmp_path / "tend.pid").exists()
    for child in both:
        wait_until(lambda child=child: not pid_alive(int(child)))
