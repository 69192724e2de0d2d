"""`tend --nodaemon` as a user runs it: real processes, real sockets, real signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import POEM, TEND, fetch, wait_until

FOREGROUND = ["--nodaemon", "--pidfile", ""]
LOCAL = ["--port", "0", "--iface", "127.0.0.1"]


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run tend to completion (for commands that exit by themselves)."""
    return subprocess.run(
        [*TEND, *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.parametrize("notify", [False, True], ids=["alone", "under-a-notify-socket"])
def test_serves_the_bundled_poem_and_stops_on_sigterm(run_tend, tmp_path, notify):
    """The poetry plugin serves its poem; SIGTERM gives the shutdown narrative and exit 0,
    whether or not something set NOTIFY_SOCKET (most tests here run with one)."""
    tend = run_tend(*FOREGROUND, "poetry", *LOCAL, notify=notify)
    port = tend.wait_for_port()
    assert fetch(port) == POEM.read_bytes()
    tend.wait_for_output(r"sending \d+ bytes of poetry to 127\.0\.0\.1:\d+")
    assert tend.stop(signal.SIGTERM) == 0
    lines = tend.stdout.splitlines()
    narrative = [
        "Log opened.",
        "starting up.",
        "event loop class: ",
        "loaded a poem from: ",
        f"PoetryFactory starting on {port}",
        "Received SIGTERM, shutting down.",
        f"(TCP Port {port} Closed)",
        "Main loop terminated.",
        "Server Shut Down.",
    ]
    positions = []
    for expected in narrative:
        matches = [n for n, line in enumerate(lines) if expected in line]
        assert matches, f"no log line with {expected!r} in:\n{tend.stdout}"
        positions.append(matches[0])
    assert positions == sorted(positions)
    assert tend.stderr == ""


def test_log_lines_use_twistds_format(run_tend):
    """Each line reads `YYYY-MM-DD HH:MM:SS+ZZZZ [context] message`."""
    tend = run_tend(*FOREGROUND, "poetry", *LOCAL)
    tend.wait_for_port()
    tend.stop()
    first = tend.stdout.splitlines()[0]
    assert first.endswith(" [-] Log opened.")
    date, time_and_zone = first.split()[:2]
    assert len(date) == 10
    assert date[4] == "-"
    assert time_and_zone[8] in "+-"
    assert time_and_zone[9:].isdigit()


def test_sigint_stops_cleanly(run_tend):
    """Ctrl-C (SIGINT) stops the tree with exit status 0."""
    tend = run_tend(*FOREGROUND, "poetry", *LOCAL)
    tend.wait_for_port()
    assert tend.stop(signal.SIGINT) == 0
    assert "Received SIGINT, stopping 1 worker(s)." in tend.stdout
    assert "Received SIGTERM, shutting down." in tend.stdout  # the worker, told by the supervisor
    assert "Server Shut Down." in tend.stdout


def test_runs_on_uvloop(run_tend):
    """`--loop uvloop` runs the same service on uvloop."""
    pytest.importorskip("uvloop")
    tend = run_tend(*FOREGROUND, "--loop", "uvloop", "poetry", *LOCAL)
    port = tend.wait_for_port()
    assert fetch(port) == POEM.read_bytes()
    assert tend.stop() == 0
    assert "event loop class: uvloop.Loop." in tend.stdout


def test_writes_and_removes_the_pidfile_in_the_foreground(run_tend, tmp_path):
    """As the seed shows, a --nodaemon run writes tend.pid, and a clean stop removes it."""
    tend = run_tend("--nodaemon", "poetry", *LOCAL)
    tend.wait_for_port()
    pidfile = tmp_path / "tend.pid"
    assert pidfile.read_text().strip() == str(tend.pid)
    assert tend.stop() == 0
    assert not pidfile.exists()


def test_serves_on_a_unix_socket(run_tend, tmp_path):
    """An endpoint description can name a UNIX socket; the file is gone after the stop."""
    path = tmp_path / "poetry.sock"
    tend = run_tend(*FOREGROUND, "poetry", "--port", f"unix:{path}")
    tend.wait_for_output(r"starting on .*poetry\.sock")
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    assert data == POEM.read_bytes()
    assert tend.stop() == 0
    assert not path.exists()


def test_app_file_runs_its_application(run_tend, tmp_path):
    """`-y FILE` runs the `application` the file defines."""
    app = tmp_path / "app.py"
    app.write_text(
        "import tend\n"
        "from tend.poetry.server import PoetryFactory, PoetryService\n"
        f"poetry = PoetryService({str(POEM)!r})\n"
        "top = tend.MultiService()\n"
        "poetry.set_service_parent(top)\n"
        "tend.TCPServer(0, PoetryFactory(poetry), interface='127.0.0.1').set_service_parent(top)\n"
        "application = tend.Application('fastpoetry')\n"
        "top.set_service_parent(application)\n"
    )
    tend = run_tend(*FOREGROUND, "-y", str(app))
    port = tend.wait_for_port()
    assert fetch(port) == POEM.read_bytes()
    assert tend.stop() == 0


def test_example_app_file_starts_nothing_under_python(tmp_path):
    """`python examples/fastpoetry.py` only builds the tree: it exits at once, serving nothing."""
    example = Path(__file__).resolve().parent.parent / "examples" / "fastpoetry.py"
    result = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert result.returncode == 0
    assert result.stdout == ""


def test_lists_plugins_with_their_descriptions(tmp_path):
    """`tend` alone prints usage, then every plugin with its description."""
    result = run(cwd=tmp_path)
    assert result.returncode == 0
    assert "usage: tend" in result.stdout
    assert "poetry" in result.stdout
    assert "A fast poetry service." in result.stdout


def test_plugin_help_shows_options_and_defaults(tmp_path):
    """`tend poetry --help` shows the plugin's options with their defaults."""
    result = run("poetry", "--help", cwd=tmp_path)
    assert result.returncode == 0
    shown = " ".join(result.stdout.split())  # argparse wraps to the terminal's width
    for text in ("--port", "-p", "--iface", "--poem", "(default: 10000)", "(default: localhost)"):
        assert text in shown


def test_drop_in_plugin_folder_is_found(run_tend, tmp_path):
    """A file in a tend_plugins/ folder on PYTHONPATH is listed and runs; a broken one is named."""
    folder = tmp_path / "extra" / "tend_plugins"
    folder.mkdir(parents=True)
    (folder / "hello.py").write_text(
        "import asyncio, tend\n"
        "class Hello(asyncio.Protocol):\n"
        "    def connection_made(self, transport):\n"
        "        transport.write(b'hello\\n'); transport.close()\n"
        "class HelloMaker(tend.ServiceMaker):\n"
        "    name = 'hello'\n"
        "    description = 'Says hello.'\n"
        "    options = (tend.Option('port', 'p', '0', 'Port.'),)\n"
        "    def make_service(self, options):\n"
        "        return tend.StreamServer(f\"tcp:{options['port']}:interface=127.0.0.1\", Hello)\n"
        "maker = HelloMaker()\n"
    )
    (folder / "broken.py").write_text("import no_such_module_anywhere\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "extra")}
    listing = run(cwd=tmp_path, env=env)
    assert "hello" in listing.stdout
    assert "Says hello." in listing.stdout
    assert "poetry" in listing.stdout
    assert "broken.py" in listing.stderr
    assert "no_such_module_anywhere" in listing.stderr
    tend = run_tend(*FOREGROUND, "hello", env=env)
    port = tend.wait_for_port()
    assert fetch(port) == b"hello\n"
    assert tend.stop() == 0


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["petry"], 2, "tend: unknown plugin 'petry'; did you mean 'poetry'?"),
        (["poetry", "--port", "tcp:abc"], 2, "argument -p/--port: invalid endpoint 'tcp:abc'"),
        (["poetry", "--prot", "1"], 2, "unrecognized arguments: --prot"),
        (
            ["--loop", "trio", "poetry"],
            2,
            "argument --loop: expected one of auto, asyncio, uvloop, not 'trio'",
        ),
        (["--umask", "9x", "poetry"], 2, "argument --umask: invalid umask '9x'"),
        (["poetry", "--poem", "missing.txt", *LOCAL], 1, "tend: cannot read poem file"),
        (["-y", "nope.py"], 1, "tend: cannot read app file"),
    ],
)
def test_mistakes_give_one_line_and_a_status(tmp_path, args, status, message):
    """A user's mistake prints one line naming the problem, with the documented status."""
    result = run(*FOREGROUND, *args, cwd=tmp_path)
    assert result.returncode == status, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("tend")]
    assert len(error_lines) == 1, result.stderr


def test_missing_poem_names_the_file_and_reason(tmp_path):
    """A missing poem file is named with the OS's reason, exit 1, no pidfile left."""
    result = run("--nodaemon", "poetry", "--poem", "poems/missing.txt", *LOCAL, cwd=tmp_path)
    assert result.returncode == 1
    expected = (
        f"tend: cannot read poem file '{tmp_path}/poems/missing.txt': No such file or directory"
    )
    assert result.stderr.strip() == expected
    assert not (tmp_path / "tend.pid").exists()


def test_busy_port_is_one_clear_line(tmp_path):
    """A port already in use: `cannot listen on 127.0.0.1:PORT: address already in use`."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run(
            "--nodaemon", "poetry", "--port", str(port), "--iface", "127.0.0.1", cwd=tmp_path
        )
    assert result.returncode == 1
    assert (
        result.stderr.strip() == f"tend: cannot listen on 127.0.0.1:{port}: address already in use"
    )
    assert not (tmp_path / "tend.pid").exists()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def broken(:\n", "app.py: syntax error at line 1"),
        ("raise ValueError('boom')\n", "app.py: ValueError: boom"),
        ("x = 1\n", "app.py: no variable named 'application'"),
        ("application = 42\n", "app.py: 'application' is a int, not a tend.Application"),
    ],
)
def test_app_file_errors(tmp_path, source, message):
    """A broken app file is one line naming it, exit 1; its traceback goes to the log."""
    app = tmp_path / "app.py"
    app.write_text(source)
    result = run("--nodaemon", "-y", str(app), cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if "ValueError" in message:
        assert "Traceback" in result.stdout  # the log, under --nodaemon
    assert not (tmp_path / "tend.pid").exists()


def test_failure_in_a_later_service_stops_the_ones_started(run_tend, tmp_path):
    """When a service fails to start, those already started stop in reverse; exit 1."""
    app = tmp_path / "app.py"
    app.write_text(
        "import logging, tend\n"
        "log = logging.getLogger('app')\n"
        "class Named(tend.Service):\n"
        "    async def start_service(self):\n"
        "        log.info('start:%s', self.name); await super().start_service()\n"
        "    async def stop_service(self):\n"
        "        log.info('stop:%s', self.name); await super().stop_service()\n"
        "class Failing(tend.Service):\n"
        "    async def start_service(self):\n"
        "        raise RuntimeError('no database')\n"
        "application = tend.Application('app')\n"
        "Named('a').set_service_parent(application)\n"
        "Named('b').set_service_parent(application)\n"
        "Failing('c').set_service_parent(application)\n"
    )
    result = run("--nodaemon", "-y", str(app), cwd=tmp_path)
    assert result.returncode == 1
    assert "RuntimeError: no database" in result.stderr
    events = [line.split("] ")[1] for line in result.stdout.splitlines() if "[app]" in line]
    assert events == ["start:a", "start:b", "stop:b", "stop:a"]


def test_a_client_mid_transfer_finishes_during_the_drain(run_tend, tmp_path):
    """Connections open at SIGTERM may finish; the listener closes at once."""
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 8_000_000)
    tend = run_tend(*FOREGROUND, "poetry", *LOCAL, "--poem", str(big))
    port = tend.wait_for_port()
    with socket.socket() as client:
        # A small window keeps most of the poem in the server's buffers at SIGTERM.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.connect(("127.0.0.1", port))
        first = client.recv(1024)
        tend.process.send_signal(signal.SIGTERM)
        tend.wait_for_output(r"Closed\)")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port)).close()
        received = len(first)
        while chunk := client.recv(1 << 20):
            received += len(chunk)
    assert received == 8_000_000
    assert tend.wait() == 0


def test_second_signal_forces_an_immediate_stop(run_tend, tmp_path):
    """A second SIGTERM during a slow stop exits at once with status 1, saying so."""
    app = tmp_path / "app.py"
    app.write_text(
        "import asyncio, tend\n"
        "class Slow(tend.Service):\n"
        "    async def stop_service(self):\n"
        "        print('stopping slowly', flush=True)\n"
        "        await asyncio.sleep(3600)\n"
        "application = tend.Application('slow')\n"
        "Slow('slow').set_service_parent(application)\n"
    )
    tend = run_tend("--nodaemon", "-y", str(app))
    tend.wait_for_output(r"event loop class")
    wait_until(lambda: (tmp_path / "tend.pid").exists())
    tend.process.send_signal(signal.SIGTERM)
    tend.wait_for_output("stopping slowly")
    assert tend.stop(signal.SIGTERM) == 1
    assert "Received SIGTERM again, stopping the workers at once." in tend.stdout
    assert "Asked by the supervisor to stop at once." in tend.stdout
    assert not (tmp_path / "tend.pid").exists()


def test_a_stop_sent_to_the_whole_group_still_drains(run_tend, tmp_path):
    """SIGTERM to the process group (supervisord's stopasgroup) reaches the worker twice, once
    directly and once from the supervisor: that is one stop, and the drain still happens."""
    tend = run_tend("--nodaemon", "--pidfile=", "--shutdown-timeout", "20", "poetry",
                    "--port", "0", "--iface", "127.0.0.1", "--chunk-size", "200",
                    "--delay", "0.05")  # fmt: skip
    port = tend.wait_for_port()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        first = client.recv(65536)
        os.killpg(tend.pid, signal.SIGTERM)  # run_tend starts tend in a session of its own
        rest = b""
        while chunk := client.recv(65536):
            rest += chunk
    assert first + rest == POEM.read_bytes()
    assert tend.wait() == 0
    assert "again" not in tend.stdout


def test_a_stop_that_reaches_the_worker_twice_late_still_drains(run_tend, tmp_path):
    """systemd's KillMode=control-group signals every process of the unit, and tend's
    supervisor passes its SIGTERM on, possibly much later (it may be busy): still one stop,
    and the slow poem is whole."""
    tend = run_tend("--nodaemon", "--pidfile=", "--shutdown-timeout", "20", "poetry",
                    "--port", "0", "--iface", "127.0.0.1", "--chunk-size", "200",
                    "--delay", "0.05")  # fmt: skip
    port = tend.wait_for_port()
    worker = int(tend.wait_for_output(r"started worker 1 \(pid (\d+)\)").group(1))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        first = client.recv(65536)
        os.kill(worker, signal.SIGTERM)  # systemd's, to the worker
        tend.wait_for_output("Received SIGTERM, shutting down.")
        began = time.monotonic()
        wait_until(lambda: time.monotonic() - began > 0.5)  # the supervisor is late
        tend.process.send_signal(signal.SIGTERM)  # systemd's, to the supervisor
        rest = b""
        while chunk := client.recv(65536):
            rest += chunk
    assert first + rest == POEM.read_bytes()
    assert tend.wait() == 0
    assert "at once" not in tend.stdout


def test_relative_unix_socket_is_removed_from_where_it_was_made(run_tend, tmp_path):
    """A relative unix: path is bound and later removed where tend started, despite --rundir."""
    rundir = tmp_path / "run"
    rundir.mkdir()
    innocent = rundir / "p.sock"
    innocent.write_text("precious")  # same name in the rundir: must survive
    tend = run_tend(*FOREGROUND, "--rundir", str(rundir), "poetry", "--port", "unix:p.sock")
    tend.wait_for_output(r"starting on .*p\.sock")
    assert (tmp_path / "p.sock").is_socket()
    assert tend.stop() == 0
    assert not (tmp_path / "p.sock").exists()
    assert innocent.read_text() == "precious"


def test_sigterm_during_a_slow_start_stops_cleanly(run_tend, tmp_path):
    """A stop signal while a service is still starting cancels the start: one line, exit 1."""
    app = tmp_path / "app.py"
    app.write_text(
        "import asyncio, tend\n"
        "class Slow(tend.Service):\n"
        "    async def start_service(self):\n"
        "        print('starting slowly', flush=True)\n"
        "        await asyncio.sleep(3600)\n"
        "application = tend.Application('slow')\n"
        "Slow('slow').set_service_parent(application)\n"
    )
    tend = run_tend("--nodaemon", "-y", str(app))
    tend.wait_for_output("starting slowly")
    assert tend.stop(signal.SIGTERM, when_ready=False) == 1
    assert tend.stderr.strip() == "tend: stopped by SIGTERM before the services were ready"
    assert not (tmp_path / "tend.pid").exists()


def test_sigterm_while_the_app_file_loads_stops_cleanly(run_tend, tmp_path):
    """A stop signal before the event loop exists still ends with one line and no pidfile."""
    app = tmp_path / "app.py"
    app.write_text(
        "import time, tend\n"
        "print('loading', flush=True)\n"
        "time.sleep(3600)\n"
        "application = tend.Application('never')\n"
    )
    tend = run_tend("--nodaemon", "-y", str(app))
    tend.wait_for_output("loading")
    assert tend.stop(signal.SIGTERM, when_ready=False) == 1
    assert tend.stderr.strip() == "tend: stopped by SIGTERM before the services were ready"
    assert "Traceback" not in tend.stderr


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e300"])
def test_unbounded_shutdown_timeout_is_a_usage_error(tmp_path, value):
    """--shutdown-timeout takes 0 to 86400 seconds."""
    result = run("--shutdown-timeout", value, "poetry", cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --shutdown-timeout: invalid duration" in result.stderr


def test_auto_loop_is_uvloop_when_installed_else_asyncio(run_tend):
    """Without --loop, tend runs on uvloop if it is installed, and on asyncio if not."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        expected = "event loop class: asyncio."
    else:
        expected = "event loop class: uvloop.Loop."
    tend = run_tend(*FOREGROUND, "poetry", *LOCAL)
    tend.wait_for_port()
    assert tend.stop() == 0
    assert expected in tend.stdout


def test_asyncio_loop_can_be_asked_for(run_tend):
    """--loop asyncio runs on the standard library's loop even when uvloop is installed."""
    tend = run_tend(*FOREGROUND, "--loop", "asyncio", "poetry", *LOCAL)
    port = tend.wait_for_port()
    assert fetch(port) == POEM.read_bytes()
    assert tend.stop() == 0
    assert "event loop class: asyncio.unix_events._UnixSelectorEventLoop." in tend.stdout
