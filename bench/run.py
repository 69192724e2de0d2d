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
from collections.abc import Callable, Iterable, Sequence
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
PROJECT_POEM = REPO / "src" / "tend" / "poetry" / "poems" / "ecstasy.txt"
DEFAULT_OUTPUT = BENCH / "results" / "latest.json"

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


@dataclass(frozen=True)
class Server:
    """One row of the benchmark: how to start it and what it stands for."""

    name: str
    what: str
    kind: str  # "tend", "twistd", "bare" or "epoll"
    loop: str = "asyncio"
    workers: int = 1
    logs: bool = True

    @property
    def ready_on_stdout(self) -> bool:
        """Bare and C servers print their port; tend and twistd log `starting on PORT`."""
        return self.kind in ("bare", "epoll")

    def command(self, poem: Path, log_path: Path, extra: Sequence[str] = ()) -> list[str]:
        if self.kind == "tend":
            argv = [str(TEND), "--nodaemon", "--pidfile", "", "-l", str(log_path)]
            argv += ["--loop", self.loop]  # named even for asyncio: tend's default is auto
            if self.workers > 1:
                argv += ["--workers", str(self.workers)]
            argv += ["poetry", "--port", "0", "--iface", "127.0.0.1", "--poem", str(poem)]
            return argv + list(extra)
        if self.kind == "twistd":
            return [
                str(TWISTD),
                "--nodaemon",
                "--pidfile=",
                "-l",
                str(log_path),
                "fastpoetry",
                "--port",
                "0",
                "--poem",
                str(poem),
                "--iface",
                "127.0.0.1",
            ]
        if self.kind == "bare":
            argv = [sys.executable, str(BARE_SERVER), "--poem", str(poem), "--loop", self.loop]
            return argv + (["--log", str(log_path)] if self.logs else [])
        return [str(EPOLL_SERVER), "0", str(poem)]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # Let Python cache bytecode as an installed service would: without the cache
        # every start compiles tend's (editable) sources again.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if self.kind == "twistd":
            paths = [str(TWISTED_PLUGIN), env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return env


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
]
SERVER_NAMES = [s.name for s in SERVERS]


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


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


def tree_rss_kib(pid: int) -> int:
    """VmRSS of *pid* and all its descendants, in KiB."""
    return rss_kib(pid) + sum(rss_kib(child) for child in descendants(pid))


# --------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class Pinning:
    """Which CPUs servers and the load generator run on (taskset), if any."""

    server_cpus: tuple[int, ...] = ()
    loadgen_cpus: tuple[int, ...] = ()
    description: str = "no pinning"

    def server_prefix(self, workers: int = 1) -> list[str]:
        if not self.server_cpus:
            return []
        cpus = self.server_cpus[: max(1, workers)]
        return ["taskset", "-c", ",".join(map(str, cpus))]

    def loadgen_prefix(self) -> list[str]:
        if not self.loadgen_cpus:
            return []
        return ["taskset", "-c", ",".join(map(str, self.loadgen_cpus))]


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


@dataclass
class Running:
    server: Server
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    exec_to_first_fetch_s: float | None
    idle_rss_kib: int


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
                chunk = os.read(proc.stdout.fileno(), 100)
                if not chunk:
                    proc.wait(timeout=5)
                    raise ServerFailedError(f"exited: {stderr_tail(proc, stderr_path)}")
                line += chunk
        return int(line.strip())
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


def wait_first_fetch(
    proc: subprocess.Popen[bytes], port: int, size: int, full_fetch: bool, stderr_path: Path
) -> None:
    """Poll until the server serves the whole poem (or, for a slow server, accepts)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if not full_fetch:
                socket.create_connection(("127.0.0.1", port), timeout=10).close()
                return
            poem = fetch(port)
            if len(poem) != size:
                raise ServerFailedError(f"served {len(poem)} bytes, not the poem's {size}")
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
    ctx: Context, server: Server, extra: Sequence[str] = (), full_fetch: bool = True
) -> Running:
    """Start *server*, time exec to first fetch, and read its idle RSS."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{server.name}.log"
    for old in log_files(log_path):
        old.unlink()
    stderr_path = LOGS / f"{server.name}.stderr"
    argv = ctx.pinning.server_prefix(server.workers) + server.command(ctx.poem, log_path, extra)
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
        wait_first_fetch(proc, port, ctx.poem_size, full_fetch, stderr_path)
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


def run_loadgen(ctx: Context, args: Sequence[str], timeout: float) -> Json:
    argv = [*ctx.pinning.loadgen_prefix(), str(LOADGEN), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise ServerFailedError(f"loadgen failed ({done.returncode}): {done.stderr.strip()}")
    result: Json = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def load(ctx: Context, running: Running, concurrency: int, duration: float) -> Json:
    """One load window: loadgen's result plus the server's CPU over the window."""
    pid = running.proc.pid
    before = tree_cpu_ticks(pid)
    result = run_loadgen(
        ctx,
        [
            "-c",
            str(concurrency),
            "-d",
            str(duration),
            "-b",
            str(ctx.poem_size),
            "127.0.0.1",
            str(running.port),
        ],
        timeout=duration + 60,
    )
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


def measure_round(ctx: Context, server: Server, settings: Settings) -> Json:
    """Start, warm up, measure at the main concurrency and the sweep, stop."""
    running = start(ctx, server)
    sample: Json = {
        "exec_to_first_fetch_ms": 1000 * (running.exec_to_first_fetch_s or 0),
        "idle_rss_kib": running.idle_rss_kib,
    }
    fetched = 1  # the first fetch
    try:
        if settings.warmup > 0:
            warm = load(ctx, running, settings.concurrency, settings.warmup)
            fetched += warm["fetches"] + warm["mismatches"]
        main = load(ctx, running, settings.concurrency, settings.duration)
        fetched += main["fetches"] + main["mismatches"]
        sample["load"] = main
        sample["sweep"] = {}
        for clients in settings.sweep:
            if clients == settings.concurrency:
                sample["sweep"][str(clients)] = main
                continue
            swept = load(ctx, running, clients, settings.sweep_duration)
            fetched += swept["fetches"] + swept["mismatches"]
            sample["sweep"][str(clients)] = swept
    finally:
        exit_s, status = stop(ctx, running.proc)
    sample["exit_after_sigterm_ms"] = 1000 * exit_s
    sample["exit_status"] = status
    sample["clean_exit"] = clean_exit(status)
    if server.logs:
        sample["log_lines"] = count_log_lines(running.log_path)
        sample["fetches_served"] = fetched
    return sample


def measure_start(ctx: Context, server: Server) -> Json:
    """Only start (to the first fetch) and stop: more samples of the cheap figures."""
    running = start(ctx, server)
    exit_s, status = stop(ctx, running.proc)
    return {
        "exec_to_first_fetch_ms": 1000 * (running.exec_to_first_fetch_s or 0),
        "idle_rss_kib": running.idle_rss_kib,
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
        "exit_after_sigterm_ms": spread(s["exit_after_sigterm_ms"] for s in every_start),
        "unclean_exits": sum(not s["clean_exit"] for s in every_start),
        "sweep": {},
    }
    for clients in sweep:
        runs = [s["sweep"][str(clients)] for s in samples if "sweep" in s]
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


def median_of(summary: Json | None, key: str) -> float | None:
    if summary is None or summary.get(key) is None:
        return None
    value: float = summary[key]["median"]
    return value


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}{TIMES}" if value is not None else DASH


def fmt_spread(value: Json | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None:
        return DASH
    median = f"{value['median'] * scale:,.{digits}f}"
    if value["n"] < 2:
        return median
    return f"{median} ({value['min'] * scale:,.{digits}f}{DASH}{value['max'] * scale:,.{digits}f})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report(results: Json, settings: Settings) -> str:
    """The markdown the README quotes."""
    meta = results["meta"]
    summaries: dict[str, Json] = {}
    for name, row in results["servers"].items():
        if "summary" in row:
            rounds = row["summary"]["rounds"]
            label = (
                name
                if rounds == settings.rounds
                else f"{name} ({rounds} of {settings.rounds} rounds)"
            )
            summaries[label] = row["summary"]
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
        "",
        "### Throughput (primary figure: server CPU µs per fetch, lower is better)",
        "",
    ]
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
    out.append(
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

    out += ["", "### Start, memory, stop", ""]
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
                fmt_spread(summary["exit_after_sigterm_ms"]),
                str(summary["unclean_exits"]),
            ]
        )
    out.append(
        markdown_table(
            [
                "server",
                "exec → first fetch ms",
                "vs twistd",
                "idle RSS MiB",
                "vs twistd",
                "exit after SIGTERM ms",
                "unclean exits",
            ],
            rows,
        )
    )

    if settings.sweep:
        out += ["", "### Fetches/s by concurrent clients (p99 µs in brackets)", ""]
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
        out.append(markdown_table(["server", *(f"@{c}" for c in settings.sweep)], rows))

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

    if results["targets"]:
        out += ["", "### Targets", ""]
        rows = [
            [t["target"], fmt_ratio(t["measured"]), t["goal"], t["verdict"]]
            for t in results["targets"]
        ]
        out.append(markdown_table(["target", "measured", "goal", "verdict"], rows))

    if results["notes"]:
        out += ["", "Notes:", ""]
        out += [f"- {n}" for n in results["notes"]]
    return "\n".join(out) + "\n"


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


def available(selected: list[Server], notes: list[str]) -> list[Server]:
    """The selected servers that can run here; a note for each that cannot."""
    help_text = tend_help() if any(s.kind == "tend" for s in selected) else None
    try:
        import uvloop  # noqa: F401 (only checking that it is installed)

        has_uvloop = True
    except ImportError:
        has_uvloop = False
    ready = []
    for server in selected:
        reason = None
        if server.kind == "tend" and help_text is None:
            reason = f"{TEND} --help fails: tend cannot run yet"
        elif server.kind == "tend" and server.workers > 1 and "--workers" not in help_text:
            reason = "tend has no --workers option yet"
        elif server.kind == "twistd" and not TWISTD.exists():
            reason = f"{TWISTD} is missing: run `make -C bench venv`"
        elif server.kind == "epoll" and not EPOLL_SERVER.exists():
            reason = f"{EPOLL_SERVER} is missing: run `make -C bench build`"
        elif server.loop == "uvloop" and not has_uvloop:
            reason = "uvloop is not installed in this interpreter"
        if reason:
            notes.append(f"{server.name} skipped: {reason}.")
        else:
            ready.append(server)
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
    parser.add_argument("--only", help="comma-separated servers: " + ",".join(SERVER_NAMES))
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line timings")
    parser.add_argument("--no-hold", action="store_true", help="skip the slow-poetry hold")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results JSON")
    parser.add_argument("--tend", type=Path, default=TEND, help=f"the tend to run ({TEND})")
    args = parser.parse_args(argv)
    if args.only:
        args.only = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in args.only if name not in SERVER_NAMES]
        if unknown:
            parser.error(f"unknown server {unknown[0]!r}; known: {', '.join(SERVER_NAMES)}")
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
    )
    if settings.rounds < 1 or settings.duration <= 0:
        parser.error("--rounds and --duration must be positive")
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
        "servers": {s.name: {"what": s.what, "samples": [], "starts": []} for s in servers},
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
                measure_start(ctx, server)
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
            for server in servers:
                if server.name in failed:
                    continue
                try:
                    results["servers"][server.name]["starts"].append(measure_start(ctx, server))
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
    candidates = [s for s in servers if s.kind == "tend" and s.workers == 1]
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
    global TEND  # one tend per run, as the commands above read it
    args, settings = parse_args(sys.argv[1:] if argv is None else argv)
    TEND = args.tend.absolute()
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
