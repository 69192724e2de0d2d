"""Benchmark tend against twistd, bare asyncio/uvloop and a C epoll server, side by side.

Run with the project's venv (tend and uvloop installed there), after ``make -C bench build
venv``; ``make -C bench`` does both and then runs this. Every server serves the same poem
to the same load generator (``build/loadgen``), one server at a time, in rounds that
alternate the order. The primary figure is the server's CPU time per completed fetch,
read from /proc before and after each load window; fetches/s and latency stand beside it.
A second set of tables covers starting (exec to first fetch), idle memory, stopping, the
command line's own speed, concurrency, and how many slow clients tend can hold.

Progress goes to standard error; the markdown tables go to standard output, and
everything measured goes to ``results/latest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import http.client
import importlib.metadata
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUILD = BENCH / "build"
LOGS = BUILD / "logs"
LOADGEN = BUILD / "loadgen"
EPOLL_SERVER = BUILD / "epoll_server"
BARE_SERVER = BENCH / "bare_server.py"
TWISTD = BENCH / ".venv" / "bin" / "twistd"
TWISTED_PYTHON = BENCH / ".venv" / "bin" / "python"
TWISTED_PLUGIN = BENCH / "twisted_plugin"
# Not resolved: the venv's python is a symlink, and its bin/ is where tend lives.
TEND = Path(sys.executable).parent / "tend"
TENDCTL = TEND.parent / "tendctl"
PROJECT_POEM = REPO / "src" / "tend" / "poetry" / "poems" / "ecstasy.txt"
DEFAULT_OUTPUT = BENCH / "results" / "latest.json"
WWW = BUILD / "www"
RUNDIRS = BUILD / "run"

CLK_TCK = os.sysconf("SC_CLK_TCK")
PORT_LINE = re.compile(rb"starting on (\d+)")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
WANTED_NOFILE = 65536
# Typography for the tables, spelled out so no one mistakes them for x and -.
TIMES = "\N{MULTIPLICATION SIGN}"
DASH = "\N{EN DASH}"

Json = dict[str, Any]


class ServerFailedError(Exception):
    """A server did not start, died, or served the wrong poem; the message says which."""


def note(message: str) -> None:
    """Progress for the person watching; stdout is kept for the tables."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- servers


# The tables a row belongs to. "poetry" rows also get the concurrency sweep, the start,
# memory and stop table, and the targets.
GROUPS = ("poetry", "workers", "proxy-cached", "proxy-miss", "reload", "web")


@dataclass(frozen=True)
class Server:
    """One row of the benchmark: how to start it and what it stands for."""

    name: str
    what: str
    kind: str  # "tend", "twistd", "bare", "epoll" or "http.server"
    loop: str = "asyncio"
    workers: int = 1
    logs: bool = True
    group: str = "poetry"
    # "pinned": the server on its own CPU(s), the load generator on the last one;
    # "shared": both may run on every CPU (the --workers rows); "helper": an upstream
    # that is not measured, on the load generator's CPU.
    placement: str = "pinned"
    app: str = "poetry"  # "poetry", "proxy" or "web"
    cache: bool = True  # proxy rows: serve from the cache, or fetch for every client
    web_file: str = ""  # web rows: the file under build/www that is fetched
    reloads: bool = False  # the reload row: `tendctl reload` every second under load

    @property
    def ready_on_stdout(self) -> bool:
        """Bare, C and http.server print their port; tend and twistd log `starting on PORT`."""
        return self.kind in ("bare", "epoll", "http.server")

    def command(self, where: Launch) -> list[str]:
        if self.kind == "tend":
            pidfile = str(where.pidfile) if where.pidfile else ""
            argv = [str(TEND), "--nodaemon", "--pidfile", pidfile, "-l", str(where.log_path)]
            argv += ["--loop", self.loop]  # named even for asyncio: tend's default is auto
            if self.workers > 1:
                argv += ["--workers", str(self.workers)]
            if self.app == "proxy":
                argv += ["poetry-proxy", "--port", "0", "--iface", "127.0.0.1"]
                argv += ["--server", f"127.0.0.1:{where.upstream_port}"]
                return argv + ([] if self.cache else ["--cache-ttl", "0"])
            if self.app == "web":
                argv += ["web", "--listen", "tcp:0:interface=127.0.0.1", "--path", str(WWW)]
                return argv
            argv += ["poetry", "--port", "0", "--iface", "127.0.0.1", "--poem", str(where.poem)]
            return argv + list(where.extra)
        if self.kind == "twistd":
            argv = [str(TWISTD), "--nodaemon", "--pidfile=", "-l", str(where.log_path)]
            if self.app == "proxy":
                argv += ["poetryproxy", "--port", "0", "--iface", "127.0.0.1"]
                argv += ["--server", f"127.0.0.1:{where.upstream_port}"]
                return argv + ([] if self.cache else ["--no-cache"])
            if self.app == "web":
                return [*argv, "web", "--listen", "tcp:0:interface=127.0.0.1", "--path", str(WWW)]
            return [
                *argv,
                "fastpoetry",
                "--port",
                "0",
                "--poem",
                str(where.poem),
                "--iface",
                "127.0.0.1",
            ]
        if self.kind == "http.server":
            # HTTP/1.1, or it answers HTTP/1.0 and closes after every response. -u: it
            # prints its port with print(), which a pipe would buffer.
            argv = [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1"]
            return [*argv, "--directory", str(WWW), "--protocol", "HTTP/1.1", "0"]
        if self.kind == "bare":
            argv = [
                sys.executable,
                str(BARE_SERVER),
                "--poem",
                str(where.poem),
                "--loop",
                self.loop,
            ]
            return argv + (["--log", str(where.log_path)] if self.logs else [])
        return [str(EPOLL_SERVER), "0", str(where.poem)]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # Let Python cache bytecode as an installed service would: without the cache
        # every start compiles tend's (editable) sources again.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if self.kind == "twistd":
            paths = [str(TWISTED_PLUGIN), env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return env


@dataclass(frozen=True)
class Launch:
    """What a server's command line names: files, and the upstream a proxy fetches from."""

    poem: Path
    log_path: Path
    extra: Sequence[str] = ()
    upstream_port: int = 0
    pidfile: Path | None = None


# A 2 KiB and a 1 MiB file, made in build/www by run.py, for the web rows.
WEB_FILES = {"2k.bin": 2048, "1m.bin": 1024 * 1024}


def web_rows(size: str, file: str) -> list[Server]:
    return [
        Server(
            f"tend-web-{size}",
            f"`tend --loop uvloop web --path DIR`, {size} file, keep-alive",
            "tend",
            "uvloop",
            group="web",
            app="web",
            web_file=file,
        ),
        Server(
            f"twistd-web-{size}",
            f"`twistd web --path DIR`, {size} file, keep-alive",
            "twistd",
            group="web",
            app="web",
            web_file=file,
        ),
        Server(
            f"http.server-{size}",
            f"`python -m http.server --protocol HTTP/1.1`, {size} file, keep-alive",
            "http.server",
            group="web",
            app="web",
            web_file=file,
        ),
    ]


SERVERS = [
    Server("tend-asyncio", "`tend poetry`, default asyncio loop, log line to -l FILE", "tend"),
    Server("tend-uvloop", "`tend --loop uvloop poetry`, log line to -l FILE", "tend", "uvloop"),
    Server(
        "tend-uvloop-w2",
        "`tend --loop uvloop --workers 2 poetry`, log line to -l FILE",
        "tend",
        "uvloop",
        workers=2,
    ),
    Server("twistd", "`twistd fastpoetry` (the seed's plugin), log.msg to -l FILE", "twistd"),
    Server("bare-asyncio", "asyncio.Protocol: write, close; no log", "bare", logs=False),
    Server("bare-uvloop", "the same on uvloop; no log", "bare", "uvloop", logs=False),
    Server(
        "bare-uvloop-log",
        "the same on uvloop + the log line via logging.FileHandler",
        "bare",
        "uvloop",
    ),
    Server("epoll-c", "C epoll server: the machine's ceiling; no log", "epoll", logs=False),
    Server(
        "tend-uvloop-shared",
        "`tend --loop uvloop poetry` (1 worker), server and load generator on every CPU",
        "tend",
        "uvloop",
        group="workers",
        placement="shared",
    ),
    Server(
        "tend-uvloop-w2-shared",
        "`tend --loop uvloop --workers 2 poetry`, server and load generator on every CPU",
        "tend",
        "uvloop",
        workers=2,
        group="workers",
        placement="shared",
    ),
    Server(
        "tend-proxy",
        "`tend --loop uvloop poetry-proxy --server UPSTREAM`, serving from its cache",
        "tend",
        "uvloop",
        group="proxy-cached",
        app="proxy",
    ),
    Server(
        "twistd-proxy",
        "`twistd poetryproxy --server UPSTREAM` (the tutorial's proxy), from its cache",
        "twistd",
        group="proxy-cached",
        app="proxy",
    ),
    Server(
        "tend-proxy-miss",
        "`tend --loop uvloop poetry-proxy --cache-ttl 0`, slow upstream",
        "tend",
        "uvloop",
        group="proxy-miss",
        app="proxy",
        cache=False,
    ),
    Server(
        "twistd-proxy-miss",
        "`twistd poetryproxy --no-cache`, slow upstream",
        "twistd",
        group="proxy-miss",
        app="proxy",
        cache=False,
    ),
    Server(
        "tend-steady",
        "`tend --loop uvloop --pidfile PATH poetry`, no reload (the reload row's baseline)",
        "tend",
        "uvloop",
        group="reload",
    ),
    Server(
        "tend-reload",
        "the same, with `tendctl reload` every second under load",
        "tend",
        "uvloop",
        group="reload",
        reloads=True,
    ),
    *web_rows("2k", "2k.bin"),
    *web_rows("1m", "1m.bin"),
]
SERVER_NAMES = [s.name for s in SERVERS]
# Names --only takes for a whole group of rows.
ONLY_GROUPS = {
    "poetry": ("poetry",),
    "workers": ("workers",),
    "proxy": ("proxy-cached", "proxy-miss"),
    "reload": ("reload",),
    "web": ("web",),
}


# --------------------------------------------------------------------------- /proc


def proc_stat(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat from the state on (field 3), or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return data[data.rindex(b")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Every live process below *pid* (tend's workers, say)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu_ticks(pid: int) -> int:
    """utime+stime of *pid*, its threads and its children, live or reaped, in clock ticks."""
    total = 0
    fields = proc_stat(pid)
    if fields is not None:
        # utime, stime, cutime, cstime: fields 14-17 of proc(5), 11-14 here.
        total += sum(int(f) for f in fields[11:15])
    for child in descendants(pid):
        fields = proc_stat(child)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total


def _proc_kib(path: str, field: str) -> int:
    """The ``FIELD: N kB`` figure of a /proc file, in KiB (0 if the process is gone)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 if it is gone)."""
    return _proc_kib(f"/proc/{pid}/status", "VmRSS")


def pss_kib(pid: int) -> int:
    """Pss of one process in KiB (0 if it is gone): each page shared with other processes
    counted as its share, so that a forked tree's memory is not counted twice."""
    return _proc_kib(f"/proc/{pid}/smaps_rollup", "Pss")


def tree_rss_kib(pid: int) -> int:
    """VmRSS of *pid* and all its descendants, in KiB."""
    return rss_kib(pid) + sum(rss_kib(child) for child in descendants(pid))


def tree_pss_kib(pid: int) -> int:
    """Pss of *pid* and all its descendants, in KiB: what the tree costs the machine."""
    return pss_kib(pid) + sum(pss_kib(child) for child in descendants(pid))


# --------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class Pinning:
    """Which CPUs servers and the load generator run on (taskset), if any."""

    server_cpus: tuple[int, ...] = ()
    loadgen_cpus: tuple[int, ...] = ()
    description: str = "no pinning"

    def server_prefix(self, workers: int = 1, placement: str = "pinned") -> list[str]:
        if not self.server_cpus:
            return []
        if placement == "shared":
            cpus = self.server_cpus + self.loadgen_cpus
        elif placement == "helper":
            cpus = self.loadgen_cpus
        else:
            cpus = self.server_cpus[: max(1, workers)]
        return ["taskset", "-c", ",".join(map(str, cpus))]

    def loadgen_prefix(self, placement: str = "pinned") -> list[str]:
        if not self.loadgen_cpus:
            return []
        # run.py itself runs on the load generator's CPU, and its children inherit that:
        # a shared row has to name every CPU to be let out.
        cpus = self.server_cpus + self.loadgen_cpus if placement == "shared" else self.loadgen_cpus
        return ["taskset", "-c", ",".join(map(str, cpus))]


def choose_pinning(enabled: bool) -> Pinning:
    """Servers on the first CPUs, the load generator (and this script) on the last one."""
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled:
        return Pinning(description="pinning disabled (--no-pin)")
    if len(cpus) < 2:
        return Pinning(description=f"no pinning: only {len(cpus)} CPU available")
    if shutil.which("taskset") is None:
        return Pinning(description="no pinning: taskset not found")
    loadgen = (cpus[-1],)
    servers = tuple(cpus[:-1])
    # This script only waits, but keep it off the server's CPU all the same.
    os.sched_setaffinity(0, loadgen)
    return Pinning(
        servers,
        loadgen,
        f"servers pinned to CPU {servers[0]} (a --workers N server to CPUs "
        f"{','.join(map(str, servers))}, at most N), load generator and run.py "
        f"to CPU {loadgen[0]}, with taskset",
    )


def cpu_times() -> dict[str, list[int]]:
    """Per-CPU jiffies from /proc/stat: user nice system idle iowait irq softirq steal."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            times[name] = [int(v) for v in values[:8]]
    return times


def busy_before_start(seconds: float = 0.5) -> dict[str, float]:
    """How busy each CPU is while the benchmark does nothing: other load skews it."""
    before = cpu_times()
    time.sleep(seconds)
    after = cpu_times()
    busy = {}
    for name, values in after.items():
        delta = [a - b for a, b in zip(values, before[name], strict=True)]
        total = sum(delta)
        idle = delta[3] + delta[4]
        busy[name] = 100 * (total - idle) / total if total else 0.0
    return busy


def raise_nofile(wanted: int) -> str:
    """Raise RLIMIT_NOFILE for this process and so for every child it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return f"RLIMIT_NOFILE {soft}"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return f"RLIMIT_NOFILE raised to {soft}"


def make_web_files() -> None:
    """build/www/2k.bin and 1m.bin for the web rows: fixed bytes, made once."""
    WWW.mkdir(parents=True, exist_ok=True)
    for name, size in WEB_FILES.items():
        path = WWW / name
        if not path.is_file() or path.stat().st_size != size:
            pattern = bytes(range(256))
            path.write_bytes((pattern * (size // len(pattern) + 1))[:size])


def poem_file() -> Path:
    """The project's poem if it is there, else a generated ~3000-byte one in build/."""
    if PROJECT_POEM.is_file():
        return PROJECT_POEM
    path = BUILD / "poem.txt"
    if not path.is_file():
        verse = "the sea remembers every stone it turned and every light that fell upon the"
        words = verse.split(" ")
        lines = []
        i = 0
        while sum(len(line) + 1 for line in lines) < 2950:
            lines.append(" ".join(words[(i * 7 + k) % len(words)] for k in range(4 + i % 6)))
            i += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    return path


def version_of(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "unavailable"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def machine_info(pinning: Pinning, nofile: str) -> Json:
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break

    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    git = ["git", "-C", str(REPO)]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": cpu_model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "tend": dist("tend"),
        "uvloop": dist("uvloop"),
        "twisted": version_of(
            [str(TWISTED_PYTHON), "-c", "import twisted; print(twisted.__version__)"]
        )
        if TWISTED_PYTHON.exists()
        else "not installed",
        "git": version_of([*git, "describe", "--always", "--dirty"]),
        "pinning": pinning.description,
        "nofile": nofile,
    }


# --------------------------------------------------------------------------- running


@dataclass
class Context:
    """What every measurement shares."""

    poem: Path
    poem_size: int
    pinning: Pinning
    live: set[subprocess.Popen[bytes]] = field(default_factory=set)

    def expected_size(self, server: Server) -> int:
        """What one fetch brings: the poem, or a web row's file."""
        return WEB_FILES[server.web_file] if server.app == "web" else self.poem_size


@dataclass
class Running:
    server: Server
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    exec_to_first_fetch_s: float | None
    idle_rss_kib: int
    idle_pss_kib: int
    pidfile: Path | None = None
    upstream: Running | None = None  # a proxy's upstream poetry server


def log_files(log_path: Path) -> list[Path]:
    """The log file and the rotated ones beside it (FILE.1, FILE.2, ...)."""
    return sorted(log_path.parent.glob(log_path.name + "*"))


def stderr_tail(proc: subprocess.Popen[bytes], path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        if lines:
            return lines[-1][:300]
    return f"exit status {proc.returncode}"


def wait_for_port(
    server: Server, proc: subprocess.Popen[bytes], log_path: Path, stderr_path: Path
) -> int:
    """The port the server bound: its first stdout line, or `starting on PORT` in its log."""
    deadline = time.monotonic() + READY_TIMEOUT
    if server.ready_on_stdout:
        assert proc.stdout is not None
        line = b""
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise ServerFailedError(f"printed no port in {READY_TIMEOUT:.0f} s")
                chunk = os.read(proc.stdout.fileno(), 1)  # no further: the rest is its own
                if not chunk:
                    proc.wait(timeout=5)
                    raise ServerFailedError(f"exited: {stderr_tail(proc, stderr_path)}")
                line += chunk
        # A bare number, or http.server's "Serving HTTP on 127.0.0.1 port 8000 (...) ...".
        match = re.fullmatch(rb"\s*(\d+)\s*", line) or re.search(rb"port (\d+)", line)
        if match is None:
            raise ServerFailedError(f"printed no port: {line[:200]!r}")
        return int(match.group(1))
    while True:
        with contextlib.suppress(OSError):
            match = PORT_LINE.search(log_path.read_bytes())
            if match:
                return int(match.group(1))
        if proc.poll() is not None:
            raise ServerFailedError(f"exited: {stderr_tail(proc, stderr_path)}")
        if time.monotonic() > deadline:
            raise ServerFailedError(f"logged no 'starting on PORT' in {READY_TIMEOUT:.0f} s")
        time.sleep(0.001)


def fetch(port: int) -> bytes:
    """One poem, read to end of file, by a plain blocking client."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def http_get(port: int, path: str) -> bytes:
    """One response body, from a plain HTTP/1.1 client."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise ServerFailedError(f"GET {path}: HTTP status {response.status}")
        return body
    finally:
        connection.close()


def wait_first_fetch(
    proc: subprocess.Popen[bytes],
    port: int,
    size: int,
    full_fetch: bool,
    stderr_path: Path,
    web_path: str = "",
) -> None:
    """Poll until the server serves the whole poem or file (or, for a slow server, accepts)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if not full_fetch:
                socket.create_connection(("127.0.0.1", port), timeout=10).close()
                return
            poem = http_get(port, web_path) if web_path else fetch(port)
            if len(poem) != size:
                raise ServerFailedError(f"served {len(poem)} bytes, not the {size} expected")
            return
        except OSError as error:
            if proc.poll() is not None:
                raise ServerFailedError(f"exited: {stderr_tail(proc, stderr_path)}") from None
            if time.monotonic() > deadline:
                raise ServerFailedError(
                    f"no fetch succeeded in {READY_TIMEOUT:.0f} s: {error}"
                ) from None
            time.sleep(0.001)


def start(
    ctx: Context,
    server: Server,
    extra: Sequence[str] = (),
    full_fetch: bool = True,
    upstream_port: int = 0,
) -> Running:
    """Start *server*, time exec to first fetch, and read its idle RSS."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{server.name}.log"
    for old in log_files(log_path):
        old.unlink()
    stderr_path = LOGS / f"{server.name}.stderr"
    pidfile = None
    if server.group == "reload":
        # A pidfile, so that tend opens its control socket (tend.ctl) beside it.
        rundir = RUNDIRS / server.name
        rundir.mkdir(parents=True, exist_ok=True)
        pidfile = rundir / "tend.pid"
    where = Launch(ctx.poem, log_path, extra, upstream_port, pidfile)
    argv = ctx.pinning.server_prefix(server.workers, server.placement) + server.command(where)
    env = server.environment()
    with stderr_path.open("wb") as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if server.ready_on_stdout else subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            cwd=BUILD,
            start_new_session=True,
        )
    ctx.live.add(proc)
    try:
        port = wait_for_port(server, proc, log_path, stderr_path)
        web_path = f"/{server.web_file}" if server.app == "web" else ""
        size = ctx.expected_size(server)
        wait_first_fetch(proc, port, size, full_fetch, stderr_path, web_path)
        exec_to_fetch = time.perf_counter() - started
    except BaseException:
        stop(ctx, proc)
        raise
    return Running(
        server,
        proc,
        port,
        log_path,
        exec_to_fetch if full_fetch else None,
        tree_rss_kib(proc.pid),
        tree_pss_kib(proc.pid),
        pidfile,
    )


def stop(ctx: Context, proc: subprocess.Popen[bytes]) -> tuple[float, int | None]:
    """SIGTERM, then wait: seconds to exit and exit status (None if it had to be killed)."""
    started = time.perf_counter()
    status: int | None
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        status = None
    elapsed = time.perf_counter() - started
    # Anything left in its session (a worker that outlived its parent, or the parent).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    ctx.live.discard(proc)
    return elapsed, status


def clean_exit(status: int | None) -> bool:
    """0, or death by the SIGTERM we sent (twistd re-raises the signal it stopped on)."""
    return status in (0, -signal.SIGTERM)


def loadgen_argv(ctx: Context, running: Running, concurrency: int, duration: float) -> list[str]:
    """The load generator's command line for one window against *running*."""
    server = running.server
    argv = [*ctx.pinning.loadgen_prefix(server.placement), str(LOADGEN)]
    argv += ["-c", str(concurrency), "-d", str(duration), "-b", str(ctx.expected_size(server))]
    if server.app == "web":
        argv += ["-k", f"/{server.web_file}"]
    if server.app == "proxy" and not server.cache:
        # Each fetch waits for the slow upstream: give it room before it counts as lost.
        argv += ["-T", "30"]
    return [*argv, "127.0.0.1", str(running.port)]


def parse_loadgen(returncode: int, stdout: str, stderr: str) -> Json:
    if returncode != 0:
        raise ServerFailedError(f"loadgen failed ({returncode}): {stderr.strip()}")
    result: Json = json.loads(stdout.strip().splitlines()[-1])
    return result


def load(
    ctx: Context,
    running: Running,
    concurrency: int,
    duration: float,
    during: Callable[[subprocess.Popen[str]], None] | None = None,
) -> Json:
    """One load window: loadgen's result plus the server's CPU over the window.

    *during*, if given, is called once the load generator runs, and returns before it ends
    (the reload row reloads the server from it).
    """
    pid = running.proc.pid
    before = tree_cpu_ticks(pid)
    argv = loadgen_argv(ctx, running, concurrency, duration)
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as loadgen:
        try:
            if during is not None:
                during(loadgen)
            out, err = loadgen.communicate(timeout=duration + 60)
        except BaseException:
            loadgen.kill()
            loadgen.wait()
            raise
    result = parse_loadgen(loadgen.returncode, out, err)
    after = tree_cpu_ticks(pid)
    if running.proc.poll() is not None:
        raise ServerFailedError(f"died under load (exit status {running.proc.returncode})")
    cpu_s = (after - before) / CLK_TCK
    elapsed = result["elapsed_s"]
    fetches = result["fetches"]
    result["server_cpu_s"] = cpu_s
    result["cpu_us_per_fetch"] = cpu_s * 1e6 / fetches if fetches else None
    result["server_cpu_pct"] = 100 * cpu_s / elapsed if elapsed else None
    loadgen_cpu = result["cpu_user_s"] + result["cpu_sys_s"]
    result["loadgen_cpu_pct"] = 100 * loadgen_cpu / elapsed if elapsed else None
    return result


def count_log_lines(log_path: Path) -> int:
    return sum(path.read_bytes().count(b"bytes of poetry to") for path in log_files(log_path))


@dataclass
class Settings:
    rounds: int
    duration: float
    warmup: float
    concurrency: int
    sweep: list[int]
    sweep_duration: float
    starts: int
    cli_repeat: int
    hold: int
    hold_chunk: int
    hold_delay: float
    hold_timeout: float
    reload_duration: float = 10.0
    reload_interval: float = 1.0
    miss_chunk: int = 1000
    miss_delay: float = 0.05


def upstream_of(server: Server) -> Server | None:
    """The poetry server a proxy row fetches from, on the load generator's CPU; not measured."""
    if server.app != "proxy":
        return None
    return Server(
        f"{server.name}-upstream",
        "tend poetry, the upstream of a proxy row",
        "tend",
        "uvloop",
        group="helper",
        placement="helper",
    )


@contextlib.contextmanager
def serving(ctx: Context, server: Server, settings: Settings) -> Iterator[Running]:
    """*server* started (with its upstream first, for a proxy row), and stopped after.

    The running server's ``upstream`` log is read by the caller once the block ends.
    """
    upstream = upstream_of(server)
    if upstream is None:
        running = start(ctx, server)
        try:
            yield running
        finally:
            if running.proc in ctx.live:
                stop(ctx, running.proc)
        return
    # A cache miss waits for this server's slow poem; a cached poem for its fast one.
    extra = [] if server.cache else slow_upstream_options(settings)
    up = start(ctx, upstream, extra)
    try:
        running = start(ctx, server, upstream_port=up.port)
        running.upstream = up
        try:
            yield running
        finally:
            if running.proc in ctx.live:
                stop(ctx, running.proc)
    finally:
        stop(ctx, up.proc)


def slow_upstream_options(settings: Settings) -> list[str]:
    return ["--chunk-size", str(settings.miss_chunk), "--delay", str(settings.miss_delay)]


def reloading(
    running: Running, settings: Settings, duration: float, record: list[Json]
) -> Callable[[subprocess.Popen[str]], None]:
    """While the load runs: `tendctl reload` every --reload-interval, each timed."""

    def during(loadgen: subprocess.Popen[str]) -> None:
        began = time.monotonic()
        tick = 0
        while True:
            # Half an interval in, then every interval: none at the window's very edges.
            at = began + (tick + 0.5) * settings.reload_interval
            if at >= began + duration:
                return
            time.sleep(max(0.0, at - time.monotonic()))
            if loadgen.poll() is not None:
                return
            argv = [str(TENDCTL), "--pidfile", str(running.pidfile), "reload"]
            asked = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
            record.append(
                {
                    "at_s": at - began,
                    "ms": 1000 * (time.perf_counter() - asked),
                    "status": done.returncode,
                    "said": (done.stdout + done.stderr).strip()[-300:],
                }
            )
            tick += 1

    return during


def measure_round(ctx: Context, server: Server, settings: Settings) -> Json:
    """Start, warm up, measure at the main concurrency (and the sweep), stop."""
    sample: Json = {}
    fetched = 1  # the first fetch
    clients = 1  # connections the server accepted, finished or not
    with serving(ctx, server, settings) as running:
        sample["exec_to_first_fetch_ms"] = 1000 * (running.exec_to_first_fetch_s or 0)
        sample["idle_rss_kib"] = running.idle_rss_kib
        sample["idle_pss_kib"] = running.idle_pss_kib
        if settings.warmup > 0:
            warm = load(ctx, running, settings.concurrency, settings.warmup)
            fetched += warm["fetches"] + warm["mismatches"]
            clients += warm["started"]
        if server.group == "reload":
            reloads: list[Json] = []
            during = reloading(running, settings, settings.reload_duration, reloads)
            main = load(
                ctx,
                running,
                settings.concurrency,
                settings.reload_duration,
                during if server.reloads else None,
            )
            sample["reloads"] = reloads
        else:
            main = load(ctx, running, settings.concurrency, settings.duration)
        fetched += main["fetches"] + main["mismatches"]
        clients += main["started"]
        sample["load"] = main
        sample["sweep"] = {}
        for clients in settings.sweep if server.group == "poetry" else []:
            if clients == settings.concurrency:
                sample["sweep"][str(clients)] = main
                continue
            swept = load(ctx, running, clients, settings.sweep_duration)
            fetched += swept["fetches"] + swept["mismatches"]
            sample["sweep"][str(clients)] = swept
        exit_s, status = stop(ctx, running.proc)
    sample["exit_after_sigterm_ms"] = 1000 * exit_s
    sample["exit_status"] = status
    sample["clean_exit"] = clean_exit(status)
    if server.app == "poetry" and server.logs:
        sample["log_lines"] = count_log_lines(running.log_path)
        sample["fetches_served"] = fetched
    if running.upstream is not None:
        # Less the one fetch that run.py made to see the upstream serve.
        sample["upstream_fetches"] = count_log_lines(running.upstream.log_path) - 1
        sample["clients"] = clients
    return sample


def measure_start(ctx: Context, server: Server, settings: Settings) -> Json:
    """Only start (to the first fetch) and stop: more samples of the cheap figures."""
    with serving(ctx, server, settings) as running:
        exit_s, status = stop(ctx, running.proc)
    return {
        "exec_to_first_fetch_ms": 1000 * (running.exec_to_first_fetch_s or 0),
        "idle_rss_kib": running.idle_rss_kib,
        "idle_pss_kib": running.idle_pss_kib,
        "exit_after_sigterm_ms": 1000 * exit_s,
        "exit_status": status,
        "clean_exit": clean_exit(status),
    }


def measure_hold(ctx: Context, server: Server, settings: Settings) -> Json:
    """How many slow-poetry clients tend holds at once, and the RSS each one costs."""
    extra = ["--chunk-size", str(settings.hold_chunk), "--delay", str(settings.hold_delay)]
    running = start(ctx, server, extra, full_fetch=False)
    idle = running.idle_rss_kib
    argv = [
        *ctx.pinning.loadgen_prefix(),
        str(LOADGEN),
        "-H",
        "-c",
        str(settings.hold),
        "-d",
        str(settings.hold_timeout + 30),
        "-T",
        "30",
        "-b",
        str(ctx.poem_size),
        "-r",
        "64",
        "-i",
        str(max(1, int(settings.hold_delay * 1000))),
        "-p",
        "250",
        "127.0.0.1",
        str(running.port),
    ]
    result: Json = {"target": settings.hold, "idle_rss_kib": idle}
    best: Json = {"receiving": 0}
    held_rss = idle
    try:
        with subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as loadgen:
            ctx.live.add(loadgen)
            assert loadgen.stdout is not None
            deadline = time.monotonic() + settings.hold_timeout
            last_gain = time.monotonic()
            with selectors.DefaultSelector() as selector:
                selector.register(loadgen.stdout, selectors.EVENT_READ)
                buffered = b""
                done = False
                while not done and time.monotonic() < deadline:
                    if not selector.select(max(0.0, deadline - time.monotonic())):
                        break
                    chunk = os.read(loadgen.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    buffered += chunk
                    *lines, buffered = buffered.split(b"\n")
                    for line in lines:
                        progress = json.loads(line)
                        if progress.get("type") != "progress":
                            continue
                        if progress["receiving"] > best["receiving"]:
                            best = progress
                            held_rss = tree_rss_kib(running.proc.pid)
                            last_gain = time.monotonic()
                        if progress["receiving"] >= settings.hold:
                            done = True
                        elif time.monotonic() - last_gain > 5:
                            done = True  # a plateau: it holds no more than this
            # Memory may still grow a little after the last new connection: take the later
            # reading if it is higher, while the connections are still held.
            held_rss = max(held_rss, tree_rss_kib(running.proc.pid))
            loadgen.send_signal(signal.SIGTERM)
            out, err = loadgen.communicate(timeout=30)
            ctx.live.discard(loadgen)
            final = [json.loads(line) for line in out.splitlines() if line.strip()]
            result["loadgen"] = final[-1] if final else {"error": err.decode().strip()}
    finally:
        exit_s, status = stop(ctx, running.proc)
    held = best["receiving"]
    result.update(
        held=held,
        open=best.get("open", 0),
        ramp_s=best.get("t_s"),
        held_rss_kib=held_rss,
        rss_per_connection_kib=(held_rss - idle) / held if held else None,
        exit_after_sigterm_ms=1000 * exit_s,
        exit_status=status,
    )
    return result


def time_command(ctx: Context, argv: list[str], env: dict[str, str], repeat: int) -> Json:
    """Wall time of a whole command, after one untimed run (bytecode and plugin caches)."""
    argv = ctx.pinning.server_prefix() + argv
    times = []
    done = None
    for i in range(repeat + 1):
        started = time.perf_counter()
        done = subprocess.run(
            argv, capture_output=True, env=env, cwd=BUILD, timeout=60, check=False
        )
        if i:
            times.append(1000 * (time.perf_counter() - started))
    assert done is not None
    return {"ms": times, "exit_status": done.returncode, "output_bytes": len(done.stdout)}


# --------------------------------------------------------------------------- summaries


def spread(values: Iterable[float | None]) -> Json | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {
        "median": statistics.median(present),
        "min": min(present),
        "max": max(present),
        "n": len(present),
    }


def summarize(samples: list[Json], starts: list[Json], sweep: list[int]) -> Json:
    loads = [s["load"] for s in samples if "load" in s]
    every_start = samples + starts
    summary: Json = {
        "rounds": len(loads),
        "cpu_us_per_fetch": spread(r["cpu_us_per_fetch"] for r in loads),
        "fetches_per_s": spread(r["fetches_per_s"] for r in loads),
        "p50_us": spread(r["p50_us"] for r in loads),
        "p99_us": spread(r["p99_us"] for r in loads),
        "server_cpu_pct": spread(r["server_cpu_pct"] for r in loads),
        "loadgen_cpu_pct": spread(r["loadgen_cpu_pct"] for r in loads),
        "errors": sum(r["errors"] + r["mismatches"] for r in loads),
        "exec_to_first_fetch_ms": spread(s["exec_to_first_fetch_ms"] for s in every_start),
        "idle_rss_kib": spread(s["idle_rss_kib"] for s in every_start),
        "idle_pss_kib": spread(s.get("idle_pss_kib", 0) for s in every_start),
        "exit_after_sigterm_ms": spread(s["exit_after_sigterm_ms"] for s in every_start),
        "unclean_exits": sum(not s["clean_exit"] for s in every_start),
        "failures": failure_kinds(loads),
        "requests_per_connection": spread(
            r["started"] / r["connections"] for r in loads if r.get("connections")
        ),
        "sweep": {},
    }
    proxied = [s for s in samples if "upstream_fetches" in s]
    if proxied:
        summary["upstream_per_client"] = spread(
            s["upstream_fetches"] / s["clients"] for s in proxied
        )
    reload_rounds = [s["reloads"] for s in samples if "reloads" in s]
    if any(reload_rounds):
        every_reload = [r for rounds in reload_rounds for r in rounds]
        summary["reloads"] = {
            "asked": len(every_reload),
            "done": sum(r["status"] == 0 for r in every_reload),
            "ms": spread(r["ms"] for r in every_reload),
            "failed": [r["said"] for r in every_reload if r["status"] != 0][:3],
        }
    for clients in sweep:
        runs = [s["sweep"][str(clients)] for s in samples if str(clients) in s.get("sweep", {})]
        if not runs:
            continue
        summary["sweep"][str(clients)] = {
            "fetches_per_s": spread(r["fetches_per_s"] for r in runs),
            "p99_us": spread(r["p99_us"] for r in runs),
            "cpu_us_per_fetch": spread(r["cpu_us_per_fetch"] for r in runs),
            "errors": sum(r["errors"] + r["mismatches"] for r in runs),
        }
    short_logs = [s for s in samples if "log_lines" in s and s["log_lines"] < s["fetches_served"]]
    if short_logs:
        summary["warning"] = f"logged fewer lines than fetches served in {len(short_logs)} round(s)"
    return summary


FAILURE_KINDS = ("refused", "reset", "timeout", "other", "http_status", "bad_response")


def failure_kinds(loads: list[Json]) -> Json:
    """Failed fetches over every round, by kind: the load generator's error and mismatch kinds."""
    total = dict.fromkeys([*FAILURE_KINDS, "short", "long"], 0)
    for result in loads:
        for kind, count in result.get("error_kinds", {}).items():
            total[kind] = total.get(kind, 0) + count
        for kind, count in result.get("mismatch_kinds", {}).items():
            total[kind] = total.get(kind, 0) + count
    return total


def median_of(summary: Json | None, key: str) -> float | None:
    if summary is None or summary.get(key) is None:
        return None
    value: float = summary[key]["median"]
    return value


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}{TIMES}" if value is not None else DASH


def fmt_measured(value: float | None, goal: str) -> str:
    """A target's figure as its goal is written: a ratio, or a difference in ms or MiB."""
    unit = goal.rsplit(" ", 1)[-1]
    if value is None or unit not in ("ms", "MiB"):
        return fmt_ratio(value)
    return f"{value:+.1f} {unit}"


def fmt_spread(value: Json | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None:
        return DASH
    median = f"{value['median'] * scale:,.{digits}f}"
    if value["n"] < 2:
        return median
    return f"{median} ({value['min'] * scale:,.{digits}f}{DASH}{value['max'] * scale:,.{digits}f})"


def cost_and_rate_cells(summary: Json, reference: Json | None) -> list[str]:
    """CPU µs per fetch and fetches/s, each with its ratio to *reference*'s: the four
    cells every side-by-side table shares."""
    cells = []
    for key, digits in (("cpu_us_per_fetch", 1), ("fetches_per_s", 0)):
        cells.append(fmt_spread(summary[key], digits=digits))
        cells.append(fmt_ratio(ratio(median_of(summary, key), median_of(reference, key))))
    return cells


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def row_label(name: str, row: Json, settings: Settings) -> str:
    """The row's name, and how many rounds it ran if fewer than asked."""
    rounds = row["summary"]["rounds"]
    return name if rounds == settings.rounds else f"{name} ({rounds} of {settings.rounds} rounds)"


def summary_of(results: Json, name: str) -> Json | None:
    summary: Json | None = results["servers"].get(name, {}).get("summary")
    return summary


def workers_table(results: Json, settings: Settings) -> list[str]:
    """One and two workers, the server pinned to one core and sharing both with the load."""
    rows = []
    cases = [
        ("tend-uvloop", 1, "pinned", "tend-uvloop"),
        ("tend-uvloop-w2", 2, "pinned", "tend-uvloop"),
        ("tend-uvloop-shared", 1, "shared", "tend-uvloop-shared"),
        ("tend-uvloop-w2-shared", 2, "shared", "tend-uvloop-shared"),
    ]
    if not any(summary_of(results, name) for name, *_ in cases[2:]):
        return []
    for name, workers, placement, one in cases:
        summary = summary_of(results, name)
        if summary is None:
            continue
        base = summary_of(results, one)
        rows.append(
            [
                row_label(name, results["servers"][name], settings),
                str(workers),
                "server on 1 core, load on the other"
                if placement == "pinned"
                else "server and load share every core",
                *cost_and_rate_cells(summary, base),
                fmt_spread(summary["p99_us"], digits=0),
                fmt_spread(summary["server_cpu_pct"], digits=0),
                fmt_spread(summary["loadgen_cpu_pct"], digits=0),
                str(summary["errors"]),
                str(summary["unclean_exits"]),
            ]
        )
    header = [
        "server",
        "workers",
        "CPUs",
        "CPU µs/fetch",
        "vs 1 worker",
        f"fetches/s @{settings.concurrency}",
        "vs 1 worker",
        "p99 µs",
        "server CPU %",
        "loadgen CPU %",
        "errors",
        "unclean exits",
    ]
    return [
        "",
        "### Workers: one and two, pinned and sharing the cores",
        "",
        markdown_table(header, rows),
    ]


def proxy_tables(results: Json, settings: Settings) -> list[str]:
    """tend's proxy against the tutorial's under twistd: from the cache, and on a miss."""
    out: list[str] = []
    groups = [
        ("tend-proxy", "twistd-proxy", "### The proxy, serving from its cache", False),
        (
            "tend-proxy-miss",
            "twistd-proxy-miss",
            f"### The proxy on a cache miss (upstream: `tend poetry --chunk-size "
            f"{settings.miss_chunk} --delay {settings.miss_delay:g}`, "
            f"{settings.concurrency} clients)",
            True,
        ),
    ]
    for tend_name, twistd_name, title, miss in groups:
        reference = summary_of(results, twistd_name)
        rows = []
        for name in (tend_name, twistd_name):
            summary = summary_of(results, name)
            if summary is None:
                continue
            row = [
                row_label(name, results["servers"][name], settings),
                *cost_and_rate_cells(summary, reference),
                fmt_spread(summary["p50_us"], digits=0),
                fmt_spread(summary["p99_us"], digits=0),
                fmt_spread(summary["server_cpu_pct"], digits=0),
            ]
            if miss:
                row.append(fmt_spread(summary.get("upstream_per_client"), digits=3))
            rows.append([*row, str(summary["errors"])])
        if not rows:
            continue
        header = [
            "proxy",
            "CPU µs/fetch",
            "vs twistd",
            f"fetches/s @{settings.concurrency}",
            "vs twistd",
            "p50 µs",
            "p99 µs",
            "proxy CPU %",
        ]
        if miss:
            header.append("upstream fetches per client")
        out += ["", title, "", markdown_table([*header, "errors"], rows)]
    return out


def reload_table(results: Json, settings: Settings) -> list[str]:
    """Fetches and failures while tend reloads every second, beside the same run without."""
    rows = []
    for name in ("tend-steady", "tend-reload"):
        summary = summary_of(results, name)
        if summary is None:
            continue
        failures = summary["failures"]
        reloads = summary.get("reloads")
        rows.append(
            [
                row_label(name, results["servers"][name], settings),
                f"{reloads['done']} of {reloads['asked']}" if reloads else DASH,
                fmt_spread(reloads["ms"], digits=0) if reloads else DASH,
                fmt_spread(summary["fetches_per_s"], digits=0),
                fmt_spread(summary["cpu_us_per_fetch"]),
                fmt_spread(summary["p99_us"], digits=0),
                str(failures["refused"]),
                str(failures["reset"]),
                str(failures["short"]),
                str(failures["timeout"] + failures["other"] + failures["long"]),
            ]
        )
    if not rows:
        return []
    header = [
        "server",
        "reloads done",
        "reload ms",
        f"fetches/s @{settings.concurrency}",
        "CPU µs/fetch",
        "p99 µs",
        "refused",
        "reset",
        "short",
        "other failures",
    ]
    title = (
        f"### Reload under load (`tendctl reload` every {settings.reload_interval:g} s "
        f"for {settings.reload_duration:g} s; failures summed over the rounds)"
    )
    return ["", title, "", markdown_table(header, rows)]


def web_tables(results: Json, settings: Settings) -> list[str]:
    """Static files over HTTP/1.1 keep-alive: tend web, twistd web, python -m http.server."""
    rows = []
    for size, file in (("2k", "2k.bin"), ("1m", "1m.bin")):
        reference = summary_of(results, f"twistd-web-{size}")
        for kind in ("tend-web", "twistd-web", "http.server"):
            name = f"{kind}-{size}"
            summary = summary_of(results, name)
            if summary is None:
                continue
            rows.append(
                [
                    row_label(name, results["servers"][name], settings),
                    f"{WEB_FILES[file]:,} B",
                    *cost_and_rate_cells(summary, reference),
                    fmt_spread(summary["p50_us"], digits=0),
                    fmt_spread(summary["p99_us"], digits=0),
                    fmt_spread(summary["requests_per_connection"], digits=0),
                    str(summary["errors"]),
                ]
            )
    if not rows:
        return []
    header = [
        "server",
        "file",
        "CPU µs/request",
        "vs twistd web",
        f"requests/s @{settings.concurrency}",
        "vs twistd web",
        "p50 µs",
        "p99 µs",
        "requests per connection",
        "errors",
    ]
    title = f"### Static files over HTTP/1.1 keep-alive ({settings.concurrency} connections)"
    return ["", title, "", markdown_table(header, rows)]


def report(results: Json, settings: Settings) -> str:
    """The markdown the README quotes."""
    meta = results["meta"]
    summaries: dict[str, Json] = {}
    for name, row in results["servers"].items():
        if "summary" in row and row.get("group", "poetry") == "poetry":
            summaries[row_label(name, row, settings)] = row["summary"]
    twistd = results["servers"].get("twistd", {}).get("summary")
    bare = results["servers"].get("bare-uvloop", {}).get("summary")
    out = [
        f"Benchmark of {meta['date']}: {meta['cpus']} {TIMES} {meta['cpu']}, "
        f"Linux {meta['kernel']}, "
        f"Python {meta['python']}, tend {meta['tend']}, uvloop {meta['uvloop']}, "
        f"Twisted {meta['twisted']}, git {meta['git']}.",
        f"{meta['pinning']}. {meta['nofile']}. Poem: {results['poem']['bytes']} bytes. "
        f"{settings.rounds} round(s) of {settings.duration:g} s at {settings.concurrency} "
        f"concurrent clients per server, after a warm-up; medians, with (min{DASH}max).",
    ]
    poetry = ["", "### Throughput (primary figure: server CPU µs per fetch, lower is better)", ""]
    rows = []
    for name, summary in summaries.items():
        cpu = median_of(summary, "cpu_us_per_fetch")
        fps = median_of(summary, "fetches_per_s")
        rows.append(
            [
                name,
                fmt_spread(summary["cpu_us_per_fetch"]),
                fmt_ratio(ratio(cpu, median_of(twistd, "cpu_us_per_fetch"))),
                fmt_ratio(ratio(cpu, median_of(bare, "cpu_us_per_fetch"))),
                fmt_spread(summary["fetches_per_s"], digits=0),
                fmt_ratio(ratio(fps, median_of(twistd, "fetches_per_s"))),
                fmt_spread(summary["p50_us"], digits=0),
                fmt_spread(summary["p99_us"], digits=0),
                fmt_spread(summary["server_cpu_pct"], digits=0),
                fmt_spread(summary["loadgen_cpu_pct"], digits=0),
                str(summary["errors"]),
            ]
        )
    poetry.append(
        markdown_table(
            [
                "server",
                "CPU µs/fetch",
                "vs twistd",
                "vs bare-uvloop",
                f"fetches/s @{settings.concurrency}",
                "vs twistd",
                "p50 µs",
                "p99 µs",
                "server CPU %",
                "loadgen CPU %",
                "errors",
            ],
            rows,
        )
    )

    poetry += ["", "### Start, memory, stop", ""]
    rows = []
    for name, summary in summaries.items():
        start = median_of(summary, "exec_to_first_fetch_ms")
        rss = median_of(summary, "idle_rss_kib")
        rows.append(
            [
                name,
                fmt_spread(summary["exec_to_first_fetch_ms"]),
                fmt_ratio(ratio(start, median_of(twistd, "exec_to_first_fetch_ms"))),
                fmt_spread(summary["idle_rss_kib"], scale=1 / 1024),
                fmt_ratio(ratio(rss, median_of(twistd, "idle_rss_kib"))),
                fmt_spread(summary["idle_pss_kib"], scale=1 / 1024),
                fmt_spread(summary["exit_after_sigterm_ms"]),
                str(summary["unclean_exits"]),
            ]
        )
    poetry.append(
        markdown_table(
            [
                "server",
                "exec → first fetch ms",
                "vs twistd",
                "idle RSS MiB",
                "vs twistd",
                "idle PSS MiB",
                "exit after SIGTERM ms",
                "unclean exits",
            ],
            rows,
        )
    )

    if settings.sweep:
        poetry += ["", "### Fetches/s by concurrent clients (p99 µs in brackets)", ""]
        rows = []
        for name, summary in summaries.items():
            row = [name]
            for clients in settings.sweep:
                level = summary["sweep"][str(clients)]
                fps = median_of(level, "fetches_per_s")
                p99 = median_of(level, "p99_us")
                cell = DASH if fps is None else f"{fps:,.0f}"
                if p99 is not None:
                    cell += f" [{p99:,.0f}]"
                if level["errors"]:
                    cell += f" ({level['errors']} errors)"
                row.append(cell)
            rows.append(row)
        poetry.append(markdown_table(["server", *(f"@{c}" for c in settings.sweep)], rows))

    if summaries:
        out += poetry
    out += workers_table(results, settings)
    out += proxy_tables(results, settings)
    out += reload_table(results, settings)
    out += web_tables(results, settings)

    if results["cli"]:
        out += ["", f"### The command line (wall ms, median (min{DASH}max))", ""]
        rows = [
            [f"`{command}`", fmt_spread(spread(timing["ms"])), str(timing["exit_status"])]
            for command, timing in results["cli"].items()
        ]
        out.append(markdown_table(["command", "ms", "exit status"], rows))

    if results["hold"]:
        out += [
            "",
            f"### Slow poetry: clients held at once (target {settings.hold:,}; "
            f"--chunk-size {settings.hold_chunk} --delay {settings.hold_delay:g})",
            "",
        ]
        rows = []
        for name, hold in results["hold"].items():
            if "error" in hold:
                rows.append([name, DASH, DASH, DASH, DASH, DASH, hold["error"]])
                continue
            per = hold["rss_per_connection_kib"]
            lg = hold.get("loadgen", {})
            rows.append(
                [
                    name,
                    f"{hold['held']:,}",
                    f"{hold['ramp_s']:.1f}" if hold["ramp_s"] is not None else DASH,
                    f"{hold['idle_rss_kib'] / 1024:.1f} → {hold['held_rss_kib'] / 1024:.1f}",
                    f"{per:.1f}" if per is not None else DASH,
                    f"{hold['exit_after_sigterm_ms']:.0f}",
                    f"{lg.get('errors', '?')} errors",
                ]
            )
        out.append(
            markdown_table(
                [
                    "server",
                    "held",
                    "ramp s",
                    "RSS MiB idle → held",
                    "KiB per connection",
                    "exit ms",
                    "note",
                ],
                rows,
            )
        )

    if any(t["measured"] is not None for t in results["targets"]):
        out += ["", "### Targets", ""]
        rows = [
            [t["target"], fmt_measured(t["measured"], t["goal"]), t["goal"], t["verdict"]]
            for t in results["targets"]
        ]
        out.append(markdown_table(["target", "measured", "goal", "verdict"], rows))

    if results["notes"]:
        out += ["", "Notes:", ""]
        out += [f"- {n}" for n in results["notes"]]
    return "\n".join(out) + "\n"


def difference(value: float | None, base: float | None, unit: float = 1) -> float | None:
    """*value* less *base*, in *unit*s; None if either is missing."""
    return None if value is None or base is None else (value - base) / unit


def check_targets(results: Json) -> list[Json]:
    """The project's goals, as ratios against twistd and bare uvloop."""
    s = {name: row.get("summary") for name, row in results["servers"].items()}

    def med(name: str, key: str) -> float | None:
        return median_of(s.get(name), key)

    checks: list[tuple[str, float | None, str, Callable[[float], bool]]] = [
        (
            "tend-uvloop CPU µs/fetch ÷ twistd",
            ratio(med("tend-uvloop", "cpu_us_per_fetch"), med("twistd", "cpu_us_per_fetch")),
            f"≤ 0.33{TIMES}",
            lambda v: v <= 1 / 3,
        ),
        (
            "tend-uvloop fetches/s ÷ twistd",
            ratio(med("tend-uvloop", "fetches_per_s"), med("twistd", "fetches_per_s")),
            f"≥ 2.50{TIMES}",
            lambda v: v >= 2.5,
        ),
        (
            "tend-uvloop CPU µs/fetch ÷ bare-uvloop (no log line)",
            ratio(med("tend-uvloop", "cpu_us_per_fetch"), med("bare-uvloop", "cpu_us_per_fetch")),
            f"≤ 1.30{TIMES}",
            lambda v: v <= 1.3,
        ),
        (
            "tend-asyncio exec → first fetch ÷ twistd",
            ratio(
                med("tend-asyncio", "exec_to_first_fetch_ms"),
                med("twistd", "exec_to_first_fetch_ms"),
            ),
            f"≤ 0.40{TIMES}",
            lambda v: v <= 0.4,
        ),
        (
            "tend-asyncio idle RSS ÷ twistd",
            ratio(med("tend-asyncio", "idle_rss_kib"), med("twistd", "idle_rss_kib")),
            f"≤ 0.60{TIMES}",
            lambda v: v <= 0.6,
        ),
        (
            "tend-asyncio exec → first fetch minus bare-asyncio, ms",
            difference(
                med("tend-asyncio", "exec_to_first_fetch_ms"),
                med("bare-asyncio", "exec_to_first_fetch_ms"),
            ),
            "≤ 10 ms",
            lambda v: v <= 10,
        ),
        (
            "tend-asyncio idle RSS minus bare-asyncio, MiB (the whole tree)",
            difference(
                med("tend-asyncio", "idle_rss_kib"), med("bare-asyncio", "idle_rss_kib"), 1024
            ),
            "≤ 1 MiB",
            lambda v: v <= 1,
        ),
        (
            "tend-asyncio idle PSS minus bare-asyncio, MiB (shared pages once)",
            difference(
                med("tend-asyncio", "idle_pss_kib"), med("bare-asyncio", "idle_pss_kib"), 1024
            ),
            "≤ 1 MiB",
            lambda v: v <= 1,
        ),
    ]
    return [
        {
            "target": name,
            "measured": value,
            "goal": goal,
            "verdict": "n/a" if value is None else ("met" if passes(value) else "NOT met"),
        }
        for name, value, goal, passes in checks
    ]


# --------------------------------------------------------------------------- main


def tend_help() -> str | None:
    """`tend --help` output, or None if tend cannot run yet."""
    if not TEND.exists():
        return None
    try:
        done = subprocess.run(
            [str(TEND), "--help"], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError:
        return None
    return done.stdout if done.returncode == 0 else None


@functools.cache
def tend_plugin_help(plugin: str) -> str | None:
    """`tend PLUGIN --help` output, or None if tend has no such plugin (yet)."""
    try:
        done = subprocess.run(
            [str(TEND), plugin, "--help"], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError:
        return None
    return done.stdout if done.returncode == 0 else None


def missing_feature(server: Server) -> str | None:
    """Why this tend cannot run *server*'s row, or None if it can."""
    if server.app == "web" and tend_plugin_help("web") is None:
        return "tend has no web plugin yet (`tend web --help` fails; `tend` does not list it)"
    if server.app == "proxy" and server.kind == "tend":
        proxy = tend_plugin_help("poetry-proxy")
        if proxy is None:
            return "tend has no poetry-proxy plugin"
        if not server.cache and "--cache-ttl" not in proxy:
            return "`tend poetry-proxy` has no --cache-ttl option yet"
    # Both proxies' cache misses fetch from a slow `tend poetry`.
    slow = "--chunk-size" in (tend_plugin_help("poetry") or "")
    if server.app == "proxy" and not server.cache and not slow:
        return "`tend poetry` has no --chunk-size/--delay for the slow upstream yet"
    if server.group == "reload" and not TENDCTL.exists():
        return f"{TENDCTL} is missing"
    return None


def available(selected: list[Server], notes: list[str]) -> list[Server]:
    """The selected servers that can run here; a note for each reason some cannot."""
    help_text = tend_help() if any(s.kind == "tend" or s.app == "proxy" for s in selected) else None
    try:
        import uvloop  # noqa: F401 (only checking that it is installed)

        has_uvloop = True
    except ImportError:
        has_uvloop = False
    ready = []
    skipped: dict[str, list[str]] = {}
    for server in selected:
        reason = None
        if (server.kind == "tend" or server.app == "proxy") and help_text is None:
            reason = f"{TEND} --help fails: tend cannot run yet"
        elif server.kind == "tend" and server.workers > 1 and "--workers" not in help_text:
            reason = "tend has no --workers option yet"
        elif (server.kind == "tend" or server.app == "proxy") and missing_feature(server):
            reason = missing_feature(server)
        elif server.kind == "twistd" and not TWISTD.exists():
            reason = f"{TWISTD} is missing: run `make -C bench venv`"
        elif server.kind == "epoll" and not EPOLL_SERVER.exists():
            reason = f"{EPOLL_SERVER} is missing: run `make -C bench build`"
        elif server.loop == "uvloop" and not has_uvloop:
            reason = "uvloop is not installed in this interpreter"
        if reason:
            skipped.setdefault(reason, []).append(server.name)
        else:
            ready.append(server)
    for reason, names in skipped.items():
        notes.append(f"{', '.join(names)} skipped: {reason}.")
    return ready


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        description="Benchmark tend against twistd, bare asyncio/uvloop and a C epoll server."
    )
    parser.add_argument("--rounds", type=int, help="rounds, each server once per round (3)")
    parser.add_argument("--duration", type=float, help="seconds per load window (5)")
    parser.add_argument("--warmup", type=float, help="seconds of unmeasured load first (1)")
    parser.add_argument("--concurrency", type=int, default=50, help="clients in flight (50)")
    parser.add_argument(
        "--sweep", default="1,50,200", help="client counts for the concurrency table ('' for none)"
    )
    parser.add_argument("--sweep-duration", type=float, help="seconds per sweep window (2.5)")
    parser.add_argument("--starts", type=int, help="extra start/stop cycles per server (3)")
    parser.add_argument("--cli-repeat", type=int, help="runs of each timed command (5)")
    parser.add_argument("--hold", type=int, help="slow clients to hold at once (10000)")
    parser.add_argument("--hold-chunk", type=int, default=16, help="slow poetry --chunk-size")
    parser.add_argument("--hold-delay", type=float, default=0.5, help="slow poetry --delay")
    parser.add_argument("--hold-timeout", type=float, help="seconds to reach the target (60)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--only",
        help="comma-separated rows or groups of rows ("
        + ", ".join(ONLY_GROUPS)
        + "): "
        + ",".join(SERVER_NAMES),
    )
    parser.add_argument(
        "--reload-duration", type=float, help="seconds of load in the reload rows (10)"
    )
    parser.add_argument(
        "--reload-interval", type=float, default=1.0, help="seconds between reloads (1)"
    )
    parser.add_argument(
        "--miss-chunk", type=int, default=1000, help="slow upstream --chunk-size (1000)"
    )
    parser.add_argument(
        "--miss-delay", type=float, default=0.05, help="slow upstream --delay (0.05)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line timings")
    parser.add_argument("--no-hold", action="store_true", help="skip the slow-poetry hold")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results JSON")
    parser.add_argument("--tend", type=Path, default=TEND, help=f"the tend to run ({TEND})")
    args = parser.parse_args(argv)
    if args.only:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in names if name not in SERVER_NAMES and name not in ONLY_GROUPS]
        if unknown:
            known = ", ".join([*ONLY_GROUPS, *SERVER_NAMES])
            parser.error(f"unknown server {unknown[0]!r}; known: {known}")
        args.only = {
            server.name
            for server in SERVERS
            for name in names
            if name == server.name or server.group in ONLY_GROUPS.get(name, ())
        }
    try:
        sweep = [int(c) for c in args.sweep.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--sweep: not a list of numbers: {args.sweep!r}")

    def pick(value: Any, normal: Any, quick: Any) -> Any:
        return value if value is not None else (quick if args.quick else normal)

    duration = pick(args.duration, 5.0, 1.0)
    settings = Settings(
        rounds=pick(args.rounds, 3, 1),
        duration=duration,
        warmup=pick(args.warmup, 1.0, 0.25),
        concurrency=args.concurrency,
        sweep=sweep,
        sweep_duration=pick(args.sweep_duration, max(1.0, duration / 2), 0.5),
        starts=pick(args.starts, 3, 1),
        cli_repeat=pick(args.cli_repeat, 5, 2),
        hold=0 if args.no_hold else pick(args.hold, 10000, 1000),
        hold_chunk=args.hold_chunk,
        hold_delay=args.hold_delay,
        hold_timeout=pick(args.hold_timeout, 60.0, 15.0),
        reload_duration=pick(args.reload_duration, 10.0, 2.0),
        reload_interval=args.reload_interval,
        miss_chunk=args.miss_chunk,
        miss_delay=args.miss_delay,
    )
    if settings.rounds < 1 or settings.duration <= 0:
        parser.error("--rounds and --duration must be positive")
    if settings.reload_duration <= 0 or settings.reload_interval <= 0:
        parser.error("--reload-duration and --reload-interval must be positive")
    return args, settings


def run(args: argparse.Namespace, settings: Settings) -> Json:
    if not LOADGEN.exists():
        raise SystemExit(f"run.py: {LOADGEN} is missing: run `make -C bench build` first")
    nofile = raise_nofile(max(WANTED_NOFILE, 2 * settings.hold + 1024))
    pinning = choose_pinning(not args.no_pin)
    poem = poem_file()
    ctx = Context(poem, poem.stat().st_size, pinning)
    notes: list[str] = []
    selected = [s for s in SERVERS if not args.only or s.name in args.only]
    servers = available(selected, notes)
    if any(s.app == "web" for s in servers):
        make_web_files()
    meta = machine_info(pinning, nofile)
    meta["busy_before_start_pct"] = busy = busy_before_start()
    if any(pct > 10 for pct in busy.values()):
        shares = ", ".join(f"{name} {pct:.0f}%" for name, pct in busy.items())
        notes.append(
            f"the machine was not idle before the run ({shares} busy): other processes "
            "share the CPUs, so fetches/s read low and vary; CPU µs/fetch suffers less."
        )
    note(f"bench: {pinning.description}; {nofile}; poem {poem} ({ctx.poem_size} bytes)")
    results: Json = {
        "meta": meta,
        "settings": dataclasses.asdict(settings),
        "poem": {"path": str(poem), "bytes": ctx.poem_size},
        "servers": {
            s.name: {"what": s.what, "group": s.group, "samples": [], "starts": []} for s in servers
        },
        "cli": {},
        "hold": {},
        "targets": [],
        "notes": notes,
    }
    failed: dict[str, str] = {}
    try:
        # One untimed start each first: fills the bytecode, plugin and page caches that
        # an installed service would find warm, and finds a broken server early.
        for server in servers:
            note(f"checking {server.name} starts ...")
            try:
                measure_start(ctx, server, settings)
            except ServerFailedError as error:
                failed[server.name] = str(error)
                note(f"  {server.name} failed: {error}")
        for round_index in range(settings.rounds):
            # Rotate the order every round, so drift (heat, other load) spreads evenly.
            shift = round_index % max(1, len(servers))
            for server in servers[shift:] + servers[:shift]:
                if server.name in failed:
                    continue
                note(f"[round {round_index + 1}/{settings.rounds}] {server.name} ...")
                try:
                    sample = measure_round(ctx, server, settings)
                except (ServerFailedError, subprocess.TimeoutExpired) as error:
                    failed[server.name] = str(error)
                    note(f"  {server.name} failed: {error}")
                    continue
                results["servers"][server.name]["samples"].append(sample)
                main = sample["load"]
                note(
                    f"  {main['cpu_us_per_fetch'] or 0:.1f} µs CPU/fetch, "
                    f"{main['fetches_per_s']:,.0f} fetches/s, p99 {main['p99_us']:,} µs, "
                    f"{main['errors']} errors, {main['mismatches']} mismatches; "
                    f"start {sample['exec_to_first_fetch_ms']:.0f} ms, "
                    f"exit {sample['exit_after_sigterm_ms']:.0f} ms"
                )
        for _ in range(settings.starts):
            # Only the rows of the start, memory and stop table.
            for server in servers:
                if server.name in failed or server.group != "poetry":
                    continue
                try:
                    results["servers"][server.name]["starts"].append(
                        measure_start(ctx, server, settings)
                    )
                except ServerFailedError as error:
                    failed[server.name] = str(error)
        for name, reason in failed.items():
            notes.append(f"{name} failed: {reason}")
            results["servers"][name]["error"] = reason
        for server in servers:
            row = results["servers"][server.name]
            if row["samples"]:
                row["summary"] = summarize(row["samples"], row["starts"], settings.sweep)
                if "warning" in row["summary"]:
                    notes.append(f"{server.name}: {row['summary']['warning']}.")

        if not args.no_cli:
            note("timing the command lines ...")
            results["cli"] = time_cli(ctx, servers, settings, notes)

        if settings.hold:
            results["hold"] = run_holds(ctx, servers, settings, notes)
    finally:
        for proc in list(ctx.live):
            stop(ctx, proc)
    results["targets"] = check_targets(results)
    return results


def time_cli(ctx: Context, servers: list[Server], settings: Settings, notes: list[str]) -> Json:
    kinds = {s.kind: s for s in servers}
    commands: list[tuple[str, list[str], dict[str, str]]] = []
    if "tend" in kinds:
        env = kinds["tend"].environment()
        commands += [
            ("tend --help", [str(TEND), "--help"], env),
            ("tend", [str(TEND)], env),
            ("tend poetry --help", [str(TEND), "poetry", "--help"], env),
        ]
    if "twistd" in kinds:
        env = kinds["twistd"].environment()
        commands += [
            ("twistd --help", [str(TWISTD), "--help"], env),
            ("twistd", [str(TWISTD)], env),
            ("twistd fastpoetry --help", [str(TWISTD), "fastpoetry", "--help"], env),
        ]
    timings: Json = {}
    for label, argv, env in commands:
        try:
            timings[label] = time_command(ctx, argv, env, settings.cli_repeat)
        except (OSError, subprocess.TimeoutExpired) as error:
            notes.append(f"`{label}` could not be timed: {error}")
    return timings


def run_holds(ctx: Context, servers: list[Server], settings: Settings, notes: list[str]) -> Json:
    holds: Json = {}
    candidates = [s for s in servers if s.kind == "tend" and s.group == "poetry" and s.workers == 1]
    if not candidates:
        return holds
    help_done = subprocess.run(
        [str(TEND), "poetry", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    if "--chunk-size" not in help_done.stdout or "--delay" not in help_done.stdout:
        notes.append(
            "slow-poetry hold skipped: `tend poetry` has no --chunk-size/--delay options yet."
        )
        return holds
    for server in candidates:
        note(f"holding {settings.hold:,} slow clients on {server.name} ...")
        try:
            holds[server.name] = measure_hold(ctx, server, settings)
        except (ServerFailedError, subprocess.TimeoutExpired, OSError) as error:
            holds[server.name] = {"error": str(error)}
            note(f"  failed: {error}")
            continue
        hold = holds[server.name]
        note(
            f"  held {hold['held']:,} of {settings.hold:,}; "
            f"RSS {hold['idle_rss_kib'] / 1024:.1f} → {hold['held_rss_kib'] / 1024:.1f} MiB"
        )
    return holds


def main(argv: Sequence[str] | None = None) -> int:
    global TEND, TENDCTL  # one tend per run, as the commands above read it
    args, settings = parse_args(sys.argv[1:] if argv is None else argv)
    TEND = args.tend.absolute()
    TENDCTL = TEND.parent / "tendctl"
    results = run(args, settings)
    table = report(results, settings)
    results["markdown"] = table
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(table, end="")
    note(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
