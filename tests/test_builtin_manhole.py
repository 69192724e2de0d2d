"""tend manhole: a console inside the running tend, reached with socat and nc, as root and not."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TEND, Tend, wait_until

from tend.builtins.manhole import (
    LONGEST_LINE,
    LONGEST_STATEMENT_LINES,
    console_path,
    console_socket,
)

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
STARTED = r"ManholeFactory starting on (\S+)"

needs_socat = pytest.mark.skipif(shutil.which("socat") is None, reason="needs socat (make test)")
needs_nc = pytest.mark.skipif(shutil.which("nc") is None, reason="needs netcat-openbsd")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")


def socat(path: Path | str, text: str, *, prefix: list[str] | None = None) -> str:
    """Send *text* with ``socat - UNIX-CONNECT:PATH``; return all it printed, both streams."""
    done = subprocess.run(
        [*(prefix or []), "socat", "-t", "5", "-", f"UNIX-CONNECT:{path}"],
        input=text.encode(),
        capture_output=True,
        timeout=20,
        check=False,
    )
    return (done.stdout + done.stderr).decode(errors="replace")


def start_console(
    run_tend: Callable[..., Tend], path: Path, *options: str, runner: tuple[str, ...] = ()
) -> Tend:
    """Run ``tend --nodaemon [RUNNER] manhole --socket PATH [OPTIONS]``; wait until it listens."""
    handle = run_tend("--nodaemon", *runner, "manhole", "--socket", str(path), *options)
    handle.wait_for_output(STARTED)
    return handle


class Session:
    """A console session over a plain socket, for what socat cannot show: timing, cut-offs."""

    def __init__(self, path: Path | str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.buffer = b""

    def read_until(self, marker: bytes) -> str:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed before {marker!r}: {self.buffer[-500:]!r}")
            self.buffer += chunk
        text, _, self.buffer = self.buffer.partition(marker)
        return text.decode(errors="replace")

    def read_to_end(self) -> str:
        while chunk := self.sock.recv(65536):
            self.buffer += chunk
        text, self.buffer = self.buffer, b""
        return text.decode(errors="replace")

    def run(self, line: str) -> str:
        """Send one line, return what came back before the next prompt."""
        self.sock.sendall(line.encode() + b"\n")
        return self.read_until(b">>> ")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def session() -> Iterator[Callable[[Path | str], Session]]:
    opened: list[Session] = []

    def open_session(path: Path | str) -> Session:
        made = Session(path)
        opened.append(made)
        made.read_until(b">>> ")
        return made

    yield open_session
    for made in opened:
        made.close()


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder under /tmp that nobody may traverse (pytest's own tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="tend-manhole-", dir="/tmp"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@needs_socat
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_socat_evaluates_in_the_running_tend(
    run_tend: Callable[..., Tend], tmp_path: Path, loop: str
) -> None:
    """socat evaluates len(application), a top-level await, and lists the tasks with stacks."""
    path = tmp_path / "console" / "tend.sock"
    start_console(run_tend, path, runner=("--loop", loop))
    out = socat(
        path,
        "len(application)\nawait asyncio.sleep(0, 'slept')\ntype(loop).__module__\ntasks()\n",
    )
    assert re.search(r"^tend \S+ console in pid \d+", out)
    assert ">>> 1\n" in out
    assert ">>> 'slept'\n" in out
    assert ">>> 'uvloop'\n" in out if loop == "uvloop" else ">>> 'asyncio.unix_events'\n" in out
    listing = out.split("tasks in pid", 1)[1]
    assert "_Serving.run" in listing  # tend's own serve loop, with where it waits:
    assert re.search(r'File ".*serve\.py", line \d+, in run', listing)
    assert "(this console, listing the tasks)" in listing


@needs_socat
def test_the_console_reads_and_answers_as_the_interpreter_does(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """Continuation lines get '... ', blocks show their values, _ keeps the last, errors show."""
    path = tmp_path / "console" / "tend.sock"
    start_console(run_tend, path)
    out = socat(
        path,
        "for i in range(3):\n    i * 10\n\n"
        "_ + 1\n"
        "async def twice(x):\n    await asyncio.sleep(0)\n    return 2 * x\n\n"
        "await twice(21)\n"
        "def f(:\n"
        "print('a', 'b', sep='-')\n",
    )
    assert ">>> ... ... 0\n10\n20\n" in out
    assert ">>> 21\n" in out
    assert ">>> 42\n" in out
    assert "SyntaxError" in out
    assert "a-b\n" in out


@needs_socat
def test_session_output_never_goes_to_tends_own_output(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """print, values and tracebacks go to the session; sys.stdout and the displayhook are
    left as they were, and the access line holds no code."""
    path = tmp_path / "console" / "tend.sock"
    handle = start_console(run_tend, path)
    out = socat(
        path,
        "print('PRINTED-' + 'MARK')\n"
        "'SHOWN-' + 'MARK'\n"
        "raise RuntimeError('RAISED-' + 'MARK')\n"
        "import sys; (sys.stdout is sys.__stdout__, sys.displayhook is sys.__displayhook__)\n",
    )
    assert "PRINTED-MARK\n" in out
    assert "'SHOWN-MARK'\n" in out
    assert 'File "<console>", line 1, in <module>\nRuntimeError: RAISED-MARK\n' in out
    assert "(True, True)\n" in out
    assert handle.stop() == 0
    log = handle.output
    assert re.search(r"console session of uid 0, pid \d+: [\d.]+ s, end of input", log)
    assert "MARK" not in log
    assert "Traceback" not in log


@needs_socat
def test_the_socket_is_0600_in_a_folder_of_mode_0700(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """The folder tend makes is 0700, the socket 0600, both the worker's user's."""
    path = tmp_path / "console" / "tend.sock"
    handle = start_console(run_tend, path)
    socket_status = path.lstat()
    folder_status = path.parent.lstat()
    assert stat.S_ISSOCK(socket_status.st_mode)
    assert stat.S_IMODE(socket_status.st_mode) == 0o600
    assert stat.S_IMODE(folder_status.st_mode) == 0o700
    assert socket_status.st_uid == folder_status.st_uid == os.geteuid()
    assert handle.stop() == 0
    assert not path.exists()


@needs_socat
@needs_root
def test_a_client_run_as_nobody_is_refused(
    run_tend: Callable[..., Tend], open_folder: Path
) -> None:
    """nobody cannot reach the socket through its folder, nor connect to the 0600 socket;
    and with the socket opened to all (chmod 0666), SO_PEERCRED still turns nobody away."""
    path = open_folder / "console" / "tend.sock"
    handle = start_console(run_tend, path)
    assert "Permission denied" in socat(path, "1 + 1\n", prefix=NOBODY)
    path.parent.chmod(0o711)  # the folder no longer stops nobody: the socket's mode does
    assert "Permission denied" in socat(path, "1 + 1\n", prefix=NOBODY)
    path.chmod(0o666)  # nor does the socket's mode: the check of the peer's uid does
    out = socat(path, "1 + 1\n", prefix=NOBODY)
    uid = int(subprocess.check_output([*NOBODY, "id", "-u"]))
    assert out == f"tend: uid {uid} may not use this console\n"
    assert ">>> 2" in socat(path, "1 + 1\n")  # root still may
    assert handle.stop() == 0
    assert re.search(rf"console refused uid {uid}, pid \d+: uid {uid} may not use", handle.output)


@needs_socat
@needs_root
def test_under_a_dropped_user_the_socket_is_that_users(
    run_tend: Callable[..., Tend], open_folder: Path
) -> None:
    """With -u nobody the worker binds the socket as nobody: nobody and root may connect,
    and stop() says it may not signal the root supervisor rather than failing silently."""
    shutil.chown(open_folder, "nobody", "nogroup")
    path = open_folder / "console" / "tend.sock"
    handle = start_console(run_tend, path, runner=("--uid", "nobody"))
    nobody = int(subprocess.check_output([*NOBODY, "id", "-u"]))
    assert path.lstat().st_uid == path.parent.lstat().st_uid == nobody
    assert stat.S_IMODE(path.parent.lstat().st_mode) == 0o700
    assert f">>> {nobody}\n" in socat(path, "import os; os.geteuid()\n", prefix=NOBODY)
    out = socat(path, "import os; os.geteuid()\nstop()\n")
    assert f">>> {nobody}\n" in out
    assert f"may not signal tend's supervisor (pid {handle.pid})" in out
    assert not handle.exited
    assert handle.stop() == 0


@needs_socat
def test_stop_stops_tend_gracefully(run_tend: Callable[..., Tend], tmp_path: Path) -> None:
    """stop() sends SIGTERM to the supervisor, and tend stops with status 0."""
    path = tmp_path / "console" / "tend.sock"
    handle = start_console(run_tend, path)
    out = socat(path, "stop()\n")
    assert f"sent SIGTERM to tend's supervisor (pid {handle.pid})" in out
    assert handle.wait() == 0
    assert "Received SIGTERM" in handle.output


def test_exit_ends_only_the_session(
    run_tend: Callable[..., Tend], tmp_path: Path, session: Callable[[Path | str], Session]
) -> None:
    """exit() closes the session; tend goes on, and the next session starts afresh."""
    path = tmp_path / "console" / "tend.sock"
    handle = start_console(run_tend, path)
    first = session(path)
    first.run("x = 1")
    first.sock.sendall(b"exit()\n")
    assert first.read_to_end() == ""
    second = session(path)
    assert "NameError" in second.run("x")
    assert not handle.exited


def test_stopping_tend_closes_open_sessions(
    run_tend: Callable[..., Tend], tmp_path: Path, session: Callable[[Path | str], Session]
) -> None:
    """A session open (and one awaiting) when tend stops is told so and closed; status 0."""
    path = tmp_path / "console" / "tend.sock"
    handle = start_console(run_tend, path)
    idle = session(path)
    busy = session(path)
    busy.sock.sendall(b"await asyncio.Event().wait()\n")
    assert handle.stop() == 0
    assert "tend is stopping; closing this console" in idle.read_to_end()
    busy.read_to_end()


def test_closing_a_session_cancels_what_it_runs(
    run_tend: Callable[..., Tend], tmp_path: Path, session: Callable[[Path | str], Session]
) -> None:
    """A client that leaves while its code awaits leaves no task behind."""
    path = tmp_path / "console" / "tend.sock"
    start_console(run_tend, path)
    leaving = session(path)
    leaving.sock.sendall(b"await asyncio.Event().wait()\n")
    watcher = session(path)
    count = "len([t for t in asyncio.all_tasks() if 'Session' in t.get_coro().__qualname__])"
    assert watcher.run(count).strip() == "2"
    leaving.close()
    wait_until(lambda: watcher.run(count).strip() == "1")


def test_an_idle_session_is_closed(
    run_tend: Callable[..., Tend], tmp_path: Path, session: Callable[[Path | str], Session]
) -> None:
    """A session that sends nothing, or a line it never ends, is closed after the idle timeout."""
    path = tmp_path / "console" / "tend.sock"
    handle = start_console(run_tend, path, "--idle-timeout", "0.3")
    silent = session(path)
    assert "closing: idle for 0.3 s" in silent.read_to_end()
    dripping = session(path)
    dripping.sock.sendall(b"1 +")  # no newline, ever
    assert "closing: idle for 0.3 s" in dripping.read_to_end()
    assert handle.stop() == 0
    assert re.search(r"console session of uid 0, pid \d+: [\d.]+ s, idle timeout", handle.output)


@needs_socat
def test_sessions_past_the_cap_are_refused(
    run_tend: Callable[..., Tend], tmp_path: Path, session: Callable[[Path | str], Session]
) -> None:
    """With --max-sessions 1, a second session is told to try later and closed."""
    path = tmp_path / "console" / "tend.sock"
    start_console(run_tend, path, "--max-sessions", "1")
    first = session(path)
    assert socat(path, "1\n") == "tend: too many console sessions (1); try again later\n"
    assert first.run("6 * 7").strip() == "42"
    first.close()
    wait_until(lambda: ">>> 2" in socat(path, "1 + 1\n"))


def test_a_line_too_long_is_discarded_and_the_session_goes_on(
    run_tend: Callable[..., Tend], tmp_path: Path, session: Callable[[Path | str], Session]
) -> None:
    """A line over the cap is dropped up to its newline, said so, and the next line runs."""
    path = tmp_path / "console" / "tend.sock"
    start_console(run_tend, path)
    client = session(path)
    client.sock.sendall(b"x" * (LONGEST_LINE * 4) + b"\n")
    assert f"line too long (over {LONGEST_LINE} bytes)" in client.read_until(b">>> ")
    assert client.run("1 + 1").strip() == "2"


def test_a_long_paste_is_answered_whole(
    run_tend: Callable[..., Tend], tmp_path: Path, session: Callable[[Path | str], Session]
) -> None:
    """50,000 lines sent at once are read as the client reads the answers: none dropped."""
    path = tmp_path / "console" / "tend.sock"
    start_console(run_tend, path)
    client = session(path)
    paste = b"n = 0\n" + b"n += 1\n" * 50_000 + b"n\n"
    sender = threading.Thread(target=client.sock.sendall, args=(paste,))
    sender.start()
    answer = client.read_until(b"50000\n>>> ")
    sender.join()
    assert answer.count(">>> ") == 50_001
    assert "dropped" not in answer


def test_what_the_compiler_chokes_on_is_one_error(
    run_tend: Callable[..., Tend], tmp_path: Path, session: Callable[[Path | str], Session]
) -> None:
    """Nesting too deep for the parser, a statement too long, and code cancelling the session's
    own task, are each an error in the session, which goes on."""
    path = tmp_path / "console" / "tend.sock"
    start_console(run_tend, path)
    client = session(path)
    assert "CancelledError" in client.run("asyncio.current_task().cancel(); await asyncio.sleep(0)")
    choke = client.run("-" * 60_000 + "1")
    assert re.fullmatch(r"(RecursionError|MemoryError)\b.*\n", choke), choke
    client.sock.sendall(b"x = (\n" + b"1,\n" * LONGEST_STATEMENT_LINES)
    assert f"statement too long (over {LONGEST_STATEMENT_LINES} lines" in client.read_until(
        b"import it from a file instead\n>>> "
    )
    assert client.run("6 * 7") == "42\n"


def test_output_a_client_does_not_read_is_dropped_not_hoarded(
    run_tend: Callable[..., Tend], tmp_path: Path, session: Callable[[Path | str], Session]
) -> None:
    """20 MB printed to a client that reads nothing is dropped past the cap and counted;
    the session then goes on."""
    path = tmp_path / "console" / "tend.sock"
    start_console(run_tend, path)
    client = session(path)
    done = tmp_path / "printed"
    # One line: the next would wait for the client to read what this one printed.
    line = f"_ = [print('x' * 1000) for i in range(20000)]; open({str(done)!r}, 'w').close()"
    client.sock.sendall(line.encode() + b"\n")
    wait_until(done.exists)  # the printing is over, and nothing was read meanwhile
    text = client.read_until(b" bytes of output dropped: the client was not reading them]\n>>> ")
    received, dropped = text.count("x"), int(text.rsplit("[", 1)[1])
    assert received + dropped >= 20_000_000
    assert received < 4_000_000  # what the socket holds, and the server's 1 MiB
    assert client.run("6 * 7") == "42\n"


@needs_nc
def test_nc_reaches_the_console(run_tend: Callable[..., Tend], tmp_path: Path) -> None:
    """OpenBSD netcat, with -N to send the end of its input, works as a client."""
    path = tmp_path / "console" / "tend.sock"
    start_console(run_tend, path)
    done = subprocess.run(
        ["nc", "-N", "-U", str(path)], input=b"6 * 7\n", capture_output=True, timeout=20
    )
    assert b">>> 42\n" in done.stdout


def test_a_socket_left_behind_is_replaced(run_tend: Callable[..., Tend], tmp_path: Path) -> None:
    """The socket file of a tend that was killed does not stop the next one."""
    path = tmp_path / "console" / "tend.sock"
    path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))
    handle = start_console(run_tend, path)
    assert "replaced the socket at" in handle.stdout
    assert handle.stop() == 0


def test_a_live_socket_of_another_tend_is_refused(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """A second tend given the first one's console path must not take the console over:
    one line, exit 1, and the first one's console still answers."""
    path = tmp_path / "console" / "tend.sock"
    first = start_console(run_tend, path)
    second = run_tend("--nodaemon", "--pidfile", "second.pid", "manhole", "--socket", str(path))
    assert second.wait() == 1
    assert second.stderr.startswith("tend: cannot listen on '")
    assert "tend.sock': another process (pid " in second.stderr
    assert "listens on it; stop it, or give this tend a console path of its own" in second.stderr
    assert len(second.stderr.splitlines()) == 1
    assert "4" in socat(path, "print(2 + 2)\n")
    assert first.stop() == 0


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        pytest.param(
            lambda path: path.parent.mkdir(mode=0o755),
            "group or others may enter it (mode 0755); chmod 700 it",
            id="an-open-folder",
        ),
        pytest.param(
            lambda path: (path.parent.mkdir(mode=0o700), path.write_text("mine")),
            "something other than a socket is there",
            id="a-file-at-the-path",
        ),
        pytest.param(
            lambda path: path.parent.write_text("not a folder"),
            "for the console: Not a directory",
            id="a-file-for-the-folder",
        ),
        pytest.param(
            lambda path: None if os.geteuid() else _folder_of_nobody(path.parent),
            "belongs to uid",
            id="someone-elses-folder",
            marks=needs_root,
        ),
    ],
)
def test_a_folder_or_file_it_must_not_use_is_refused(
    run_tend: Callable[..., Tend],
    tmp_path: Path,
    prepare: Callable[[Path], object],
    message: str,
) -> None:
    """tend refuses, in one line and with status 1, to put its console where others reach."""
    path = tmp_path / "console" / "tend.sock"
    prepare(path)
    handle = run_tend("--nodaemon", "manhole", "--socket", str(path))
    assert handle.wait() == 1
    lines = handle.stderr.splitlines()
    assert len(lines) == 1, handle.output
    assert message in lines[0]
    assert len(lines[0]) <= 200
    assert not (path.exists() and path.is_socket())


def _folder_of_nobody(folder: Path) -> None:
    folder.mkdir(mode=0o700)
    shutil.chown(folder, "nobody", "nogroup")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "the following arguments are required: --socket"),
        (["--socket", "tcp:7000"], "'tcp:7000' is an endpoint; the console listens only on"),
        (["--socket", "tls:7000:certKey=x.pem"], "is an endpoint; the console listens only on a"),
        (["--socket", "7000"], "'7000' is a port; the console listens only on a UNIX socket"),
        (["--socket", "unix:/tmp/console.sock"], "without 'unix:'"),
        (["--socket", "/tmp/" + "x" * 120], "125 bytes, over 100"),
        (["--socket", "."], "it is a folder"),
        (["--socket", "c.sock", "--idle-timeout", "0"], "invalid duration '0'"),
        (["--socket", "c.sock", "--max-sessions", "0"], "invalid session count '0'"),
        (["--socket", "c.sock", "--max-sessions", "lots"], "invalid session count 'lots'"),
    ],
)
def test_bad_options_are_one_line_and_status_2(
    run_tend: Callable[..., Tend], arguments: list[str], message: str
) -> None:
    """Each bad option is named in one line (and a hint), with status 2."""
    handle = run_tend("--nodaemon", "manhole", *arguments)
    assert handle.wait() == 2
    lines = handle.stderr.splitlines()
    assert 1 <= len(lines) <= 2, handle.output
    assert message in lines[0]
    assert len(lines[0]) <= 200
    assert lines[0].startswith("tend manhole: error: ")


@needs_socat
def test_an_app_file_gives_worker_n_its_own_path(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """ManholeService(path, namespace, worker=2) listens on PATH.2 with the names it was given."""
    path = tmp_path / "console" / "tend.sock"
    (tmp_path / "app.py").write_text(
        "import tend\n"
        "from tend.builtins.manhole import ManholeService\n"
        "application = tend.Application('console')\n"
        f"ManholeService({str(path)!r}, {{'answer': 42}}, worker=2)"
        ".set_service_parent(application)\n"
    )
    handle = run_tend("--nodaemon", "-y", "app.py")
    assert handle.wait_for_output(STARTED).group(1) == f"{path}.2"
    out = socat(f"{path}.2", "answer\nlen(application)\n[type(s).__name__ for s in services]\n")
    assert "(worker 2)" in out
    assert ">>> 42\n>>> 1\n>>> ['Application', 'ManholeService']\n" in out


@needs_socat
def test_a_reload_moves_the_console_to_the_new_generation(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """After SIGHUP the new generation's worker answers on PATH, and the old one, stopping,
    leaves the new socket in place."""
    path = tmp_path / "console" / "tend.sock"
    (tmp_path / "app.py").write_text(
        "import tend\n"
        "from tend.builtins.manhole import ManholeService\n"
        "application = tend.Application('console')\n"
        f"ManholeService({str(path)!r}).set_service_parent(application)\n"
    )
    handle = run_tend("--nodaemon", "-y", "app.py")
    handle.wait_for_output(STARTED)
    ask = "import os; os.getpid()\n"
    first = re.findall(r">>> (\d+)", socat(path, ask))
    handle.process.send_signal(signal.SIGHUP)
    handle.wait_for_output("reloaded: generation 2 running")
    handle.wait_for_output(r"Main loop terminated")  # the first generation's worker
    assert re.findall(r">>> (\d+)", socat(path, ask)) != first
    assert handle.stop() == 0


@needs_socat
def test_a_deployment_file_runs_the_console(run_tend: Callable[..., Tend], tmp_path: Path) -> None:
    """In a deployment file the socket is relative to the file's folder."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "tend.toml").write_text(
        '[[service]]\nplugin = "manhole"\nsocket = "console/tend.sock"\nmax-sessions = 2\n'
    )
    handle = run_tend("--nodaemon", "-c", "etc/tend.toml")
    assert handle.wait_for_output(STARTED).group(1) == str(tmp_path / "etc/console/tend.sock")
    assert ">>> 2\n" in socat(tmp_path / "etc/console/tend.sock", "1 + 1\n")


def test_console_path_names_each_workers_socket() -> None:
    """Worker 1 (or an unknown worker) listens on PATH, worker N on PATH.N."""
    assert console_path("/run/app/console.sock", None) == "/run/app/console.sock"
    assert console_path("/run/app/console.sock", 1) == "/run/app/console.sock"
    assert console_path("/run/app/console.sock", 3) == "/run/app/console.sock.3"


def test_the_socket_option_makes_paths_absolute() -> None:
    """--socket's converter, shared with the runner's --console, returns an absolute path."""
    assert console_socket("console/tend.sock") == os.path.join(os.getcwd(), "console/tend.sock")


# -- the runner's --console ------------------------------------------------------------------


@needs_socat
def test_the_console_option_gives_each_worker_its_own_socket(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """`tend --console PATH --workers 2 poetry`: worker 1 on PATH, worker 2 on PATH.2, each
    a console into its own process, beside the plugin's service."""
    path = tmp_path / "console" / "tend.sock"
    handle = run_tend("--nodaemon", "--pidfile", "", "--console", "console/tend.sock",
                      "--workers", "2", "poetry", "--port", "0")  # fmt: skip
    wait_until(lambda: len(re.findall(STARTED, handle.stdout)) == 2)
    assert sorted(re.findall(STARTED, handle.stdout)) == [str(path), f"{path}.2"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    ask = "import os; os.getpid()\n[type(s).__name__ for s in services]\n"
    first, second = socat(path, ask), socat(f"{path}.2", ask)
    pids = {int(re.findall(r">>> (\d+)", out)[0]) for out in (first, second)}
    assert len(pids) == 2
    assert pids == set(children_of(handle.pid))
    assert "'PoetryService'" in first
    assert "'ManholeService'" in first
    assert handle.stop() == 0
    assert not path.exists()


@needs_socat
def test_the_console_setting_in_a_deployment_file(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """[tend] console = PATH, relative to the file's folder, adds the console to the tree."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "tend.toml").write_text(
        '[tend]\nconsole = "run/console.sock"\n\n'
        '[[service]]\nplugin = "poetry"\nport = "tcp:0:interface=127.0.0.1"\n'
    )
    handle = run_tend("--nodaemon", "--pidfile", "", "-c", "etc/tend.toml")
    assert handle.wait_for_output(STARTED).group(1) == str(tmp_path / "etc/run/console.sock")
    assert ">>> 2\n" in socat(tmp_path / "etc/run/console.sock", "len(application)\n")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tcp:7000", "argument --console: 'tcp:7000' is an endpoint"),
        ("7000", "argument --console: '7000' is a port"),
    ],
)
def test_a_console_that_is_not_a_path_is_a_usage_error(
    tmp_path: Path, value: str, message: str
) -> None:
    """--console takes a file path only: anything else is one line and status 2."""
    done = subprocess.run(
        [*TEND, "--console", value, "poetry"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith(f"tend: error: {message}")
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def children_of(pid: int) -> list[int]:
    """The pids whose parent is *pid*."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
