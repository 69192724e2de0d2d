"""systemd: sd_notify to a real datagram socket, socket activation by the real
systemd-socket-activate, and the unit files in contrib/systemd checked by systemd-analyze."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import PASS_SOCKET, POEM, TEND, Daemons, Spawned, pid_alive, wait_until

from tend.endpoints import SystemdEndpoint, parse_endpoint
from tend.errors import StartupError
from tend.systemd import (
    Notifier,
    SocketActivationError,
    read_inherited_sockets,
)

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "contrib" / "systemd"
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None, reason="needs systemd-socket-activate (Debian package systemd)"
)
FOREGROUND = ["--nodaemon", "--pidfile", ""]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for UNIX sockets (their paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tend-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class NotifySocket:
    """The receiving end of NOTIFY_SOCKET, as systemd binds it: datagrams, with senders' pids."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(name)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.received: list[tuple[int, str]] = []

    def receive(self, timeout: float = 10.0) -> tuple[int, str]:
        """The next datagram: the pid of the process that sent it, and its text."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("iII", payload[:12])
        self.received.append((pid, data.decode()))
        return pid, data.decode()

    def wait_for(self, line: str, timeout: float = 10.0) -> tuple[int, str]:
        """Receive until a datagram holds *line*; return that datagram."""
        deadline = time.monotonic() + timeout
        while True:
            pid, text = self.receive(max(0.001, deadline - time.monotonic()))
            if line in text.split("\n"):
                return pid, text

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(short_dir: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(str(short_dir / "notify"))
    yield receiver
    receiver.close()


@pytest.fixture
def abstract_notify_socket() -> Iterator[NotifySocket]:
    receiver = NotifySocket(f"@tend-test-{uuid.uuid4().hex}")
    yield receiver
    receiver.close()


# sd_notify


def test_ready_sends_ready_and_status_in_one_datagram(notify_socket: NotifySocket) -> None:
    """ready() sends READY=1 and STATUS= as newline-separated lines of one datagram."""
    notifier = Notifier(notify_socket.address)
    try:
        assert notifier.ready("serving poetry on 127.0.0.1:10000")
        assert notify_socket.receive() == (
            os.getpid(),
            "READY=1\nSTATUS=serving poetry on 127.0.0.1:10000",
        )
    finally:
        notifier.close()


def test_notifies_an_abstract_socket(abstract_notify_socket: NotifySocket) -> None:
    """NOTIFY_SOCKET=@name reaches the abstract socket of that name."""
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": abstract_notify_socket.address})
    assert notifier is not None
    try:
        assert notifier.ready()
        assert abstract_notify_socket.receive()[1] == "READY=1"
    finally:
        notifier.close()


def test_each_notification_sends_its_lines(notify_socket: NotifySocket) -> None:
    """stopping, watchdog, ready and send each send one datagram of KEY=VALUE lines."""
    notifier = Notifier(notify_socket.address)
    try:
        notifier.stopping()
        notifier.stopping("draining 3 connections")
        notifier.watchdog()
        notifier.ready("up", mainpid=1234)
        notifier.send("RELOADING=1", "STATUS=reloading")
        texts = [notify_socket.receive()[1] for _ in range(5)]
    finally:
        notifier.close()
    assert texts == [
        "STOPPING=1",
        "STOPPING=1\nSTATUS=draining 3 connections",
        "WATCHDOG=1",
        "MAINPID=1234\nREADY=1\nSTATUS=up",
        "RELOADING=1\nSTATUS=reloading",
    ]


def test_send_refuses_a_line_that_is_not_one_assignment() -> None:
    """A line with a newline or without '=' is a programming error, not a notification."""
    notifier = Notifier("/nonexistent/notify")
    with pytest.raises(ValueError, match="not a KEY=VALUE notification line"):
        notifier.send("READY=1\nSTATUS=x")
    with pytest.raises(ValueError, match="not a KEY=VALUE notification line"):
        notifier.send("READY")


def test_a_failed_send_warns_once_and_recovers(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With nothing listening a send returns False and warns once; once it listens, sends work."""
    address = str(short_dir / "notify")
    notifier = Notifier(address)
    try:
        with caplog.at_level("WARNING", logger="tend"):
            assert not notifier.ready()
            assert not notifier.watchdog()
        warnings = [record.getMessage() for record in caplog.records]
        assert warnings == [
            f"cannot notify systemd through {address}: No such file or directory; "
            "carrying on without it"
        ]
        receiver = NotifySocket(address)
        try:
            assert notifier.watchdog()
            assert receiver.receive()[1] == "WATCHDOG=1"
        finally:
            receiver.close()
    finally:
        notifier.close()


@pytest.mark.parametrize("value", [None, ""])
def test_no_notify_socket_means_no_notifier(value: str | None) -> None:
    """Without NOTIFY_SOCKET (or with it empty) there is nobody to notify."""
    environ = {} if value is None else {"NOTIFY_SOCKET": value}
    assert Notifier.from_environment(environ) is None


def test_an_unsupported_notify_socket_is_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A relative path or a vsock: address is not something tend can reach: warn, carry on."""
    with caplog.at_level("WARNING", logger="tend"):
        assert Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert "ignoring NOTIFY_SOCKET=vsock:2:1234" in caplog.text


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_meant_for_this_process(
    environ: dict[str, str], expected: float | None
) -> None:
    """WATCHDOG_USEC gives the timeout; it is ours only if WATCHDOG_PID is unset or names us."""
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "/nonexistent", **environ}, pid=4242)
    assert notifier is not None
    assert notifier.watchdog_interval() == expected


def test_watchdog_pid_defaults_to_this_process() -> None:
    """Without an explicit pid, WATCHDOG_PID is compared with this process's pid."""
    mine = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000"}
    ours = Notifier.from_environment({**mine, "WATCHDOG_PID": str(os.getpid())})
    theirs = Notifier.from_environment({**mine, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert ours is not None
    assert theirs is not None
    assert ours.watchdog_interval() == 0.5
    assert theirs.watchdog_interval() is None


# Socket activation: reading the environment


def test_activation_without_listen_fds_says_how_tend_was_started() -> None:
    """No LISTEN_FDS: the error asks whether systemd started tend at all."""
    with pytest.raises(SocketActivationError) as caught:
        read_inherited_sockets({}, 456)
    assert str(caught.value) == (
        "cannot use socket activation: LISTEN_FDS is not set "
        "(is tend started by systemd or systemd-socket-activate?)"
    )
    assert issubclass(SocketActivationError, StartupError)


def test_activation_for_another_process_is_refused() -> None:
    """LISTEN_PID naming another process means the sockets are not this process's."""
    environ = {"LISTEN_PID": "123", "LISTEN_FDS": "1"}
    with pytest.raises(SocketActivationError) as caught:
        read_inherited_sockets(environ, 456)
    assert str(caught.value).startswith(
        "cannot use socket activation: LISTEN_PID is 123 but this process is 456; "
    )
    assert environ == {"LISTEN_PID": "123", "LISTEN_FDS": "1"}


@pytest.mark.parametrize(
    ("environ", "reason"),
    [
        ({"LISTEN_FDS": "1"}, "LISTEN_FDS is set but LISTEN_PID is not"),
        ({"LISTEN_PID": "456", "LISTEN_FDS": "one"}, "LISTEN_FDS is 'one', not a number"),
        (
            {"LISTEN_PID": "456", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web"},
            "LISTEN_FDNAMES names 1 socket(s) but LISTEN_FDS is 2",
        ),
    ],
)
def test_activation_with_inconsistent_variables_is_refused(
    environ: dict[str, str], reason: str
) -> None:
    """Variables that contradict each other are refused, naming the variable."""
    with pytest.raises(SocketActivationError) as caught:
        read_inherited_sockets(environ, 456)
    assert str(caught.value).startswith(f"cannot use socket activation: {reason}")


def test_no_passed_sockets_is_an_empty_list_and_clears_the_variables() -> None:
    """LISTEN_FDS=0 passes nothing; the variables are removed once read."""
    environ = {"LISTEN_PID": "456", "LISTEN_FDS": "0", "LISTEN_FDNAMES": "", "OTHER": "kept"}
    # LISTEN_FDNAMES="" names one (empty) socket, which LISTEN_FDS=0 contradicts.
    with pytest.raises(SocketActivationError):
        read_inherited_sockets(dict(environ), 456)
    del environ["LISTEN_FDNAMES"]
    assert read_inherited_sockets(environ, 456) == []
    assert environ == {"OTHER": "kept"}


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("systemd:index=0", SystemdEndpoint(index=0)),
        ("systemd:index=3:backlog=50", SystemdEndpoint(index=3, backlog=50)),
        ("systemd:name=poetry", SystemdEndpoint(name="poetry")),
        ("systemd:domain=INET:index=0", SystemdEndpoint(index=0, domain="INET")),
        ("systemd:name=web:domain=unix", SystemdEndpoint(name="web", domain="UNIX")),
    ],
)
def test_parses_systemd_endpoints(description: str, expected: SystemdEndpoint) -> None:
    """systemd:index=N and systemd:name=NAME parse, with twistd's domain= checked if given."""
    assert parse_endpoint(description, "localhost") == expected
    assert str(expected).startswith("systemd:")


# Socket activation: tend under the real systemd-socket-activate


class Activated(Spawned):
    """`systemd-socket-activate ... tend ...` (see Spawned)."""

    name = "systemd-socket-activate"

    def __init__(
        self,
        listen: list[str],
        tend_args: list[str],
        cwd: Path,
        passed: socket.socket | None = None,
        fdnames: str | None = None,
        accept: bool = False,
        datagram: bool = False,
    ) -> None:
        assert SOCKET_ACTIVATE is not None
        # systemd-socket-activate passes on only the variables it is told to.
        command = [SOCKET_ACTIVATE, "--setenv=PYTHONUNBUFFERED=1"]
        if "PYTHONPATH" in os.environ:
            command.append("--setenv=PYTHONPATH")
        for address in listen:
            command.append(f"--listen={address}")
        if fdnames is not None:
            command.append(f"--fdname={fdnames}")
        if accept:
            command.append("--accept")
        if datagram:
            command.append("--datagram")
        command += [*TEND, *tend_args]
        pass_fds: tuple[int, ...] = ()
        if passed is not None:
            # systemd-socket-activate takes sockets passed to it the way it passes them
            # on, so the test can bind port 0 itself: move the socket to descriptor 3.
            command = [sys.executable, "-c", PASS_SOCKET, str(passed.fileno()), *command]
            pass_fds = (passed.fileno(),)
        environment = {
            key: value for key, value in os.environ.items() if not key.startswith("LISTEN_")
        }
        environment["PYTHONUNBUFFERED"] = "1"
        super().__init__(command, cwd, environment, pass_fds=pass_fds)

    def wait_for_stderr(self, pattern: str) -> re.Match[str]:
        return self.wait_for_output(pattern, source="stderr")

    def wait_for_stdout(self, pattern: str) -> re.Match[str]:
        return self.wait_for_output(pattern, source="stdout")

    def program(self) -> str:
        """The name of the program the process runs now (it execs tend in place)."""
        return Path(f"/proc/{self.process.pid}/cmdline").read_bytes().split(b"\0")[0].decode()

    def tend_stderr(self) -> list[str]:
        """What tend wrote to standard error, after systemd-socket-activate's own lines."""
        return self.stderr.split("\nExecing ", 1)[1].splitlines()[1:]


@pytest.fixture
def activate(tmp_path: Path) -> Iterator[Callable[..., Activated]]:
    started: list[Activated] = []

    def start(*args: object, **kwargs: object) -> Activated:
        handle = Activated(*args, cwd=tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(handle)
        return handle

    yield start
    with contextlib.ExitStack() as stack:  # each is killed even if killing another fails
        for handle in started:
            stack.callback(handle.kill)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP socket listening on a free port of 127.0.0.1, to pass on; closed at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def knock(port: int) -> None:
    """Connect to *port* (which starts tend) and read until tend closes or resets it."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as client,
        contextlib.suppress(ConnectionResetError),
    ):
        read_all(client)


@needs_socket_activate
def test_serves_a_client_that_connected_before_tend_started(
    activate: Callable[..., Activated], listener: socket.socket
) -> None:
    """systemd-socket-activate listens; the first client's connection starts tend to serve it."""
    port = listener.getsockname()[1]
    activated = activate([], [*FOREGROUND, "poetry", "--port", "systemd:index=0"], passed=listener)
    listener.close()  # systemd-socket-activate holds it now
    activated.wait_for_stderr(r"^Listening on 127\.0\.0\.1:\d+ as 3\.$")
    assert activated.program() == SOCKET_ACTIVATE  # tend has not started yet

    with socket.create_connection(("127.0.0.1", port), timeout=10) as early:
        assert read_all(early) == POEM.read_bytes()

    activated.wait_for_stdout(f"PoetryFactory starting on {port}$")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as later:
        assert read_all(later) == POEM.read_bytes()
    activated.process.send_signal(signal.SIGTERM)
    assert activated.wait(15) == 0
    assert activated.tend_stderr() == []


@needs_socket_activate
def test_picks_a_socket_by_its_name(
    activate: Callable[..., Activated], listener: socket.socket
) -> None:
    """`--fdname=poetry` and `systemd:name=poetry`: tend serves the socket of that name."""
    port = listener.getsockname()[1]
    activated = activate(
        [],
        [*FOREGROUND, "poetry", "--port", "systemd:name=poetry"],
        passed=listener,
        fdnames="poetry",
    )
    listener.close()
    activated.wait_for_stderr(r"^Listening on ")

    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        assert read_all(client) == POEM.read_bytes()
    activated.wait_for_stdout(f"PoetryFactory starting on {port}$")


@needs_socket_activate
def test_an_upgrade_keeps_serving_the_passed_socket(
    activate: Callable[..., Activated], listener: socket.socket
) -> None:
    """SIGUSR2 under socket activation: the new program gets the passed socket from the old
    one (LISTEN_FDS are long gone) and serves on it; the old one exits 0."""
    port = listener.getsockname()[1]
    activated = activate(
        [],
        [*FOREGROUND, "poetry", "--port", "systemd:name=poetry"],
        passed=listener,
        fdnames="poetry",
    )
    listener.close()
    knock(port)  # the first client starts tend
    activated.wait_for_stdout(f"PoetryFactory starting on {port}$")
    activated.process.send_signal(signal.SIGUSR2)
    activated.wait_for_stdout(r"upgraded: pid \d+ serves now")
    assert activated.wait() == 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        assert read_all(client) == POEM.read_bytes()


@needs_socket_activate
def test_serves_a_passed_unix_socket_and_leaves_its_file(
    activate: Callable[..., Activated], short_dir: Path
) -> None:
    """A passed UNIX socket is served; when tend stops, the socket file (systemd's) remains."""
    path = short_dir / "poetry.sock"
    activated = activate([str(path)], [*FOREGROUND, "poetry", "--port", "systemd:index=0"])
    activated.wait_for_stderr(r"^Listening on ")

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(path))
        assert read_all(client) == POEM.read_bytes()
    activated.wait_for_stdout(f"PoetryFactory starting on {re.escape(str(path))}$")
    activated.process.send_signal(signal.SIGTERM)
    assert activated.wait(15) == 0
    assert f"(UNIX Port {path} Closed)" in activated.stdout
    assert path.is_socket()


@needs_socket_activate
def test_a_detached_tend_serves_the_passed_socket(
    activate: Callable[..., Activated],
    listener: socket.socket,
    tmp_path: Path,
    daemons: Daemons,
) -> None:
    """Without --nodaemon the launcher, which LISTEN_PID names, takes the sockets; its daemon
    serves them."""
    port = listener.getsockname()[1]
    activated = activate([], ["poetry", "--port", "systemd:index=0"], passed=listener)
    listener.close()
    activated.wait_for_stderr(r"^Listening on ")

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            poem = read_all(client)
    finally:
        assert activated.wait(15) == 0, activated.stderr
        daemons.add(int((tmp_path / "tend.pid").read_text()))
    assert poem == POEM.read_bytes()


def test_without_passed_sockets_tend_says_so_and_exits_1(tmp_path: Path) -> None:
    """`--port systemd:index=0` outside socket activation is one line on stderr, exit 1."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LISTEN_")}
    result = subprocess.run(
        [*TEND, *FOREGROUND, "poetry", "--port", "systemd:index=0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "tend: cannot use socket activation: LISTEN_FDS is not set "
        "(is tend started by systemd or systemd-socket-activate?)"
    ]


def test_sockets_passed_to_another_process_are_refused(run_tend):
    """LISTEN_PID naming another process (tend was not the one started) is refused, exit 1."""
    env = {**os.environ, "LISTEN_PID": "1", "LISTEN_FDS": "1"}
    tend = run_tend(*FOREGROUND, "poetry", "--port", "systemd:index=0", env=env)
    assert tend.wait() == 1
    lines = tend.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"tend: cannot use socket activation: LISTEN_PID is 1 but this process is {tend.pid}; "
    )


@needs_socket_activate
@pytest.mark.parametrize(
    ("endpoint", "options", "message"),
    [
        (
            "systemd:index=2",
            {},
            "tend: systemd:index=2 asks for socket 2 but only 1 was passed",
        ),
        (
            "systemd:name=admin",
            {"fdnames": "poetry"},
            "tend: systemd:name=admin asks for a socket named 'admin', but none was passed; "
            "the names passed are: 'poetry' (set FileDescriptorName= in the .socket unit)",
        ),
        (
            "systemd:index=0",
            {"accept": True},
            "tend: systemd:index=0 is socket 0 ('unknown', 127.0.0.1:{port}), which is not "
            "listening; use Accept=no (the default) in the .socket unit",
        ),
        (
            "systemd:domain=UNIX:index=0",
            {},
            "tend: systemd:index=0 is socket 0 ('unknown', 127.0.0.1:{port}), which is not in "
            "domain UNIX",
        ),
    ],
)
def test_a_passed_socket_that_does_not_fit_is_one_line_and_exit_1(
    activate: Callable[..., Activated],
    endpoint: str,
    options: dict[str, object],
    message: str,
) -> None:
    """An index out of range, an unknown name, an accepted connection or the wrong family:
    one line on stderr naming the endpoint, exit 1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    activated = activate(
        [f"127.0.0.1:{port}"], [*FOREGROUND, "poetry", "--port", endpoint], **options
    )
    activated.wait_for_stderr(r"^Listening on ")
    knock(port)
    expected = message.format(port=port)
    if options.get("accept"):
        # In --accept mode systemd-socket-activate runs on, starting tend per connection.
        activated.wait_for_stderr(f"^{re.escape(expected)}$")
        return
    assert activated.wait(15) == 1
    assert activated.tend_stderr() == [expected]


@needs_socket_activate
def test_a_passed_datagram_socket_is_refused(activate: Callable[..., Activated]) -> None:
    """`ListenDatagram=` sockets cannot serve streams: one line, exit 1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    activated = activate(
        [f"127.0.0.1:{port}"],
        [*FOREGROUND, "poetry", "--port", "systemd:index=0"],
        datagram=True,
    )
    activated.wait_for_stderr(r"^Listening on ")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"wake up", ("127.0.0.1", port))
    assert activated.wait(15) == 1
    assert activated.tend_stderr() == [
        f"tend: systemd:index=0 is socket 0 ('unknown', 127.0.0.1:{port}), which is not a "
        "stream socket; tend serves streams: use ListenStream= in the .socket unit"
    ]


# The runner tells systemd: end to end with a real NOTIFY_SOCKET


def wait_for_ready(receiver: NotifySocket, output: Callable[[], str]) -> tuple[int, str]:
    """The READY=1 datagram; if none comes, fail with what did come and tend's *output()*."""
    try:
        return receiver.wait_for("READY=1", timeout=10)
    except TimeoutError:
        raise AssertionError(
            f"no READY=1 within 10 s; the notify socket received {receiver.received!r}\n{output()}"
        ) from None


def test_foreground_tend_reports_ready_watchdog_and_stopping(run_tend, notify_socket):
    """Under Type=notify: READY=1 with a STATUS once serving, WATCHDOG=1 pings, STOPPING=1 on
    SIGTERM, every one from tend's own pid (so NotifyAccess=main accepts them)."""
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify_socket.address,
        "WATCHDOG_USEC": "200000",
        "WATCHDOG_PID": "",
    }
    tend = run_tend(*FOREGROUND, "poetry", "--port", "tcp:0:interface=127.0.0.1", env=env)
    port = tend.wait_for_port()
    sender, text = wait_for_ready(notify_socket, lambda: tend.output)
    assert sender == tend.pid
    assert re.search(rf"^STATUS=.*127\.0\.0\.1:{port}", text, re.MULTILINE), text
    for _ in range(2):
        assert notify_socket.wait_for("WATCHDOG=1")[0] == tend.pid
    tend.process.send_signal(signal.SIGTERM)
    assert notify_socket.wait_for("STOPPING=1")[0] == tend.pid
    assert tend.wait() == 0


def test_detached_tend_reports_its_daemon_as_the_main_pid(tmp_path, notify_socket, daemons):
    """Detached, the launcher (systemd's main process) sends MAINPID=<daemon> with READY=1."""
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.address}
    launcher = subprocess.Popen(
        [*TEND, "poetry", "--port", "tcp:0:interface=127.0.0.1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, errors = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, errors
    daemon = int((tmp_path / "tend.pid").read_text())
    daemons.add(daemon)
    log = tmp_path / "tend.log"

    def output() -> str:
        text = log.read_text(errors="replace") if log.exists() else "(none)"
        return f"the launcher's stderr:\n{errors}\ntend.log:\n{text}"

    sender, text = wait_for_ready(notify_socket, output)
    assert sender == launcher.pid
    assert f"MAINPID={daemon}" in text.split("\n")
    os.kill(daemon, signal.SIGTERM)
    assert notify_socket.wait_for("STOPPING=1")[0] == daemon
    wait_until(lambda: not pid_alive(daemon))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_supervisor_not_a_worker_reports_ready(run_tend, notify_socket):
    """With -u nobody, the root supervisor (systemd's main process) sends READY=1 and
    STOPPING=1 once its worker is ready and once it is told to stop."""
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.address}
    tend = run_tend(
        *FOREGROUND, "-u", "nobody", "poetry", "--port", "tcp:0:interface=127.0.0.1", env=env
    )
    tend.wait_for_port()
    sender, _ = wait_for_ready(notify_socket, lambda: tend.output)
    assert sender == tend.pid
    tend.process.send_signal(signal.SIGTERM)
    assert notify_socket.wait_for("STOPPING=1")[0] == tend.pid
    assert tend.wait() == 0


# The unit files


def verifiable_units(folder: Path) -> list[Path]:
    """Copies of contrib/systemd's units whose ExecStart= names a tend that exists here."""
    tend = Path(sys.executable).parent / "tend"
    if not tend.exists():
        pytest.skip(f"no tend script next to {sys.executable}")
    copies = []
    for unit in sorted(UNITS.glob("tend-poetry.*")):
        text = unit.read_text().replace("/usr/local/bin/tend", str(tend))
        copy = folder / unit.name
        copy.write_text(text)
        copies.append(copy)
    return copies


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to say about the service and socket units."""
    units = verifiable_units(tmp_path)
    assert [unit.name for unit in units] == ["tend-poetry.service", "tend-poetry.socket"]
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    ours = [line for line in result.stderr.splitlines() if "tend-poetry" in line]
    assert ours == []


def test_service_unit_runs_tend_as_the_runner_expects() -> None:
    """The service is Type=notify, in the foreground without a pidfile, on the passed socket."""
    service = (UNITS / "tend-poetry.service").read_text()
    socket_unit = (UNITS / "tend-poetry.socket").read_text()
    settings = dict(
        line.split("=", 1) for line in service.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["KillMode"] == "mixed"
    assert "--nodaemon" in settings["ExecStart"]
    assert "--pidfile=" in settings["ExecStart"].split()
    name = re.search(r"^FileDescriptorName=(\S+)$", socket_unit, re.MULTILINE)
    assert name is not None
    assert f"systemd:name={name.group(1)}" in settings["ExecStart"]
    assert re.search(r"^ListenStream=10000$", socket_unit, re.MULTILINE)


BLOCKING_APP = """
import asyncio, os, signal, time, tend

class Blocker(tend.Service):
    async def start_service(self):
        await super().start_service()
        # SIGUSR2 makes a callback block the loop, as a runaway computation would.
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGUSR2, lambda: (print("blocking", flush=True), time.sleep(30))
        )

application = tend.Application("blocker")
Blocker("blocker").set_service_parent(application)
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_a_blocked_event_loop_stops_the_watchdog_pings(run_tend, notify_socket, tmp_path, workers):
    """Pings come from the event loop: once it blocks, systemd hears no more of them.

    With workers, one blocked worker is enough to hold back the supervisor's pings."""
    app = tmp_path / "app.py"
    app.write_text(BLOCKING_APP)
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"}
    tend = run_tend(*FOREGROUND, "--workers", str(workers), "-y", str(app), env=env)
    wait_for_ready(notify_socket, lambda: tend.output)
    for _ in range(3):
        notify_socket.wait_for("WATCHDOG=1")
    # The supervisor runs the tree in workers (one or more): block the first one's loop.
    wait_until(
        lambda: (
            len(Path(f"/proc/{tend.pid}/task/{tend.pid}/children").read_text().split()) == workers
        )
    )
    target = int(Path(f"/proc/{tend.pid}/task/{tend.pid}/children").read_text().split()[0])
    os.kill(target, signal.SIGUSR2)
    tend.wait_for_output("blocking")
    # Drain pings already on their way, then expect silence for several intervals.
    with contextlib.suppress(TimeoutError):
        while True:
            notify_socket.receive(timeout=0.3)
    with pytest.raises(TimeoutError):
        notify_socket.wait_for("WATCHDOG=1", timeout=1.0)
    os.kill(target, signal.SIGKILL)  # what systemd would do; the blocked loop cannot stop
    tend.kill()
