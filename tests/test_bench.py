"""The benchmark's tools count what they see: bench/loadgen, the C and bare servers, run.py.

Nothing here checks a speed: only that fetches, short or long poems, resets and
refusals are each counted once and in the right column, and that every bounded run
stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
LOADGEN = BENCH / "build" / "loadgen"
EPOLL_SERVER = BENCH / "build" / "epoll_server"
BARE_SERVER = BENCH / "bare_server.py"
POEM = b"".join(
    b"line %03d of a poem that is long enough to span a few reads\n" % i for i in range(50)
)
TIMEOUT = 30


@pytest.fixture(scope="session")
def binaries() -> None:
    """Build loadgen and epoll_server with the bench Makefile (once per session)."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler (cc) to build bench/loadgen")
    if shutil.which("make") is None:
        pytest.skip("needs make to build bench/loadgen")
    built = subprocess.run(
        ["make", "-C", str(BENCH), "build/loadgen", "build/epoll_server"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr


@pytest.fixture
def poem_file(tmp_path: Path) -> Path:
    path = tmp_path / "poem.txt"
    path.write_bytes(POEM)
    return path


def read_port(proc: subprocess.Popen[bytes]) -> int:
    """The port a server prints as its first line (it prints nothing else)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"no port printed (exit status {proc.poll()})"
    return int(line)


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then its exit status (killed after a deadline, so a test never hangs)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture
def epoll_server(binaries: None, poem_file: Path) -> Iterator[int]:
    """The C epoll server serving POEM; yields its port, checks it stops on SIGTERM."""
    with subprocess.Popen([str(EPOLL_SERVER), "0", str(poem_file)], stdout=subprocess.PIPE) as proc:
        try:
            port = read_port(proc)
            yield port
        finally:
            status = stop_server(proc)
    assert status == 0


def run_loadgen(*args: object) -> dict[str, object]:
    """Run loadgen to completion; its result line, parsed."""
    done = subprocess.run(
        [str(LOADGEN), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    assert result["type"] == "result"
    return result


async def run_loadgen_async(*args: object) -> dict[str, object]:
    """The same from a test whose event loop also runs the server under test."""
    proc = await asyncio.create_subprocess_exec(
        str(LOADGEN),
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    result: dict[str, object] = json.loads(out.decode().splitlines()[-1])
    return result


def error_kinds(**counts: int) -> dict[str, int]:
    """loadgen's error_kinds with these counts, every other kind 0."""
    kinds = ("refused", "reset", "timeout", "other", "http_status", "bad_response")
    return {kind: counts.get(kind, 0) for kind in kinds}


def outcomes(result: dict[str, object]) -> int:
    """Every started connection ends in exactly one of these."""
    counts = [result[k] for k in ("fetches", "mismatches", "errors", "abandoned")]
    return sum(int(str(c)) for c in counts)


class ScriptedPoetry(asyncio.Protocol):
    """Serves connection number N as its script says: bytes then close, or a reset."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        number = self.server.connections
        self.server.connections += 1
        payload, reset = self.server.script(number)
        transport.write(payload)
        if reset:
            # SO_LINGER 0: close with a reset, as tend cuts a connection short.
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.server.resets += 1
            transport.abort()
        elif payload != POEM:
            self.server.wrong += 1
            transport.close()
        else:
            transport.close()


class ScriptedServer:
    """Counts what it served, so the test can compare with what loadgen counted."""

    def __init__(self, script: Callable[[int], tuple[bytes, bool]]) -> None:
        self.script = script
        self.connections = 0
        self.wrong = 0
        self.resets = 0


@contextlib.asynccontextmanager
async def scripted_server(
    script: Callable[[int], tuple[bytes, bool]],
) -> AsyncIterator[tuple[ScriptedServer, int]]:
    served = ScriptedServer(script)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ScriptedPoetry(served), "127.0.0.1", 0)
    try:
        yield served, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def test_bounded_run_completes_exactly_n_fetches(epoll_server: int) -> None:
    """-n 500 starts 500 connections and stops when all 500 have been fetched."""
    result = run_loadgen("-n", 500, "-c", 20, "-b", len(POEM), "127.0.0.1", epoll_server)
    assert result["started"] == 500
    assert result["fetches"] == 500
    assert (result["mismatches"], result["errors"], result["abandoned"]) == (0, 0, 0)
    assert result["bytes"] == 500 * len(POEM)


def test_bounded_run_smaller_than_concurrency(epoll_server: int) -> None:
    """-n below -c still starts only n connections."""
    result = run_loadgen("-n", 7, "-c", 50, "-b", len(POEM), "127.0.0.1", epoll_server)
    assert (result["started"], result["fetches"]) == (7, 7)


def test_timed_run_stops_by_itself(epoll_server: int) -> None:
    """-d stops the run after that long, and every started connection is accounted for."""
    result = run_loadgen("-d", 0.3, "-c", 10, "-b", len(POEM), "127.0.0.1", epoll_server)
    assert float(str(result["elapsed_s"])) >= 0.3
    assert int(str(result["fetches"])) > 0
    assert (result["mismatches"], result["errors"]) == (0, 0)
    assert outcomes(result) == result["started"]


def test_wrong_expected_size_makes_every_fetch_a_mismatch(epoll_server: int) -> None:
    """-b is what a fetch is checked against."""
    result = run_loadgen("-n", 20, "-c", 5, "-b", len(POEM) - 1, "127.0.0.1", epoll_server)
    assert (result["fetches"], result["mismatches"]) == (0, 20)


async def test_counts_short_and_long_poems_as_mismatches(binaries: None) -> None:
    """A poem with fewer or more bytes than -b is a mismatch, not a fetch or an error."""

    def script(number: int) -> tuple[bytes, bool]:
        if number % 3 == 1:
            return POEM[:-100], False
        if number % 5 == 2:
            return POEM + b"an extra line\n", False
        return POEM, False

    async with scripted_server(script) as (served, port):
        result = await run_loadgen_async("-n", 60, "-c", 4, "-b", len(POEM), "127.0.0.1", port)
    assert served.connections == 60
    assert served.wrong > 0
    assert result["mismatches"] == served.wrong
    assert result["mismatch_kinds"] == {"short": 20, "long": served.wrong - 20}
    assert result["fetches"] == 60 - served.wrong
    assert result["errors"] == 0


async def test_counts_resets_as_errors(binaries: None) -> None:
    """A connection cut with a reset is an error, even after part of the poem arrived."""

    def script(number: int) -> tuple[bytes, bool]:
        return (POEM[:500], True) if number % 2 else (POEM, False)

    async with scripted_server(script) as (served, port):
        result = await run_loadgen_async("-n", 20, "-c", 2, "-b", len(POEM), "127.0.0.1", port)
    assert served.resets == 10
    assert result["errors"] == 10
    assert result["error_kinds"] == error_kinds(reset=10)
    assert (result["fetches"], result["mismatches"]) == (10, 0)


def test_counts_refused_connections_as_errors(binaries: None) -> None:
    """Connecting to a port nobody listens on is an error of kind 'refused'."""
    with socket.socket() as bound:  # bound, never listening: refuses, and stays ours
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        result = run_loadgen("-n", 5, "-c", 2, "-b", len(POEM), "127.0.0.1", port)
    assert (result["fetches"], result["errors"]) == (0, 5)
    assert result["error_kinds"] == error_kinds(refused=5)
    assert result["first_error"] == "Connection refused"


def test_usage_error_exits_2(binaries: None) -> None:
    """Bad arguments print the usage and exit 2 without running."""
    done = subprocess.run(
        [str(LOADGEN), "-c", "zero", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    assert "usage:" in done.stderr
    assert done.stdout == ""


async def test_hold_mode_keeps_connections_open_until_stopped(binaries: None) -> None:
    """-H opens -c connections, keeps them while the server trickles, reports on SIGTERM."""
    transports: list[asyncio.Transport] = []

    class Trickle(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transports.append(transport)
            transport.write(b"x")  # one byte now, the rest never

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        str(LOADGEN),
        *("-H", "-c", "20", "-d", "60", "-p", "20", "-i", "10", "127.0.0.1", str(port)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            while True:
                progress = json.loads(await proc.stdout.readline())
                assert progress["type"] == "progress"
                if progress["receiving"] == 20:
                    break
            proc.send_signal(signal.SIGTERM)
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for transport in transports:
            transport.close()
        server.close()
        await server.wait_closed()
    result = json.loads(out.decode().splitlines()[-1])
    assert proc.returncode == 0
    assert result["mode"] == "hold"
    assert len(transports) == 20
    assert (result["connected"], result["max_receiving"], result["abandoned"]) == (20, 20, 20)
    assert (result["fetches"], result["errors"]) == (0, 0)


def test_hold_mode_reads_slowly_to_the_end(epoll_server: int) -> None:
    """In -H mode a poem read a few bytes at a time is still a fetch, and is replaced."""
    result = run_loadgen(
        "-H", "-n", 6, "-c", 2, "-r", 512, "-i", 1, "-b", len(POEM), "127.0.0.1", epoll_server
    )
    assert (result["started"], result["fetches"], result["mismatches"]) == (6, 6, 0)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_bare_server_logs_a_line_per_connection(
    binaries: None, poem_file: Path, tmp_path: Path, loop: str
) -> None:
    """bench/bare_server.py serves the poem and, with --log, logs once per connection."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    log = tmp_path / "bare.log"
    argv = [sys.executable, str(BARE_SERVER), "--poem", str(poem_file), "--loop", loop]
    with subprocess.Popen([*argv, "--log", str(log)], stdout=subprocess.PIPE) as proc:
        try:
            port = read_port(proc)
            result = run_loadgen("-n", 50, "-c", 5, "-b", len(POEM), "127.0.0.1", port)
        finally:
            status = stop_server(proc)
    assert status == 0
    assert (result["fetches"], result["mismatches"], result["errors"]) == (50, 0, 0)
    lines = log.read_text().splitlines()
    assert len(lines) == 50
    assert lines[0].startswith(f"sending {len(POEM)} bytes of poetry to ")


def test_run_py_smoke(binaries: None, tmp_path: Path) -> None:
    """bench/run.py measures two servers end to end and writes its tables and JSON."""
    output = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            *("--only", "epoll-c,bare-asyncio", "--rounds", "1", "--duration", "0.3"),
            *("--warmup", "0", "--sweep", "1", "--sweep-duration", "0.2", "--starts", "1"),
            *("--no-cli", "--no-hold", "--output", str(output)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(output.read_text())
    for name in ("epoll-c", "bare-asyncio"):
        summary = results["servers"][name]["summary"]
        assert summary["errors"] == 0
        assert summary["cpu_us_per_fetch"]["n"] == 1
        assert summary["exec_to_first_fetch_ms"]["n"] == 2
    assert "| epoll-c |" in done.stdout
    assert "| bare-asyncio |" in done.stdout


def http_response(
    body: bytes, status: str = "200 OK", headers: str = "", length: bool = True
) -> bytes:
    """An HTTP/1.1 response: the status line, headers (Content-Length unless told not), body."""
    head = f"HTTP/1.1 {status}\r\n"
    if length:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + headers + "\r\n").encode() + body


class ScriptedHTTP:
    """What a scripted HTTP server saw: requests, connections, the first request's bytes."""

    def __init__(self) -> None:
        self.requests = 0
        self.connections = 0
        self.first_request = b""


@contextlib.asynccontextmanager
async def scripted_http_server(
    script: Callable[[int], tuple[bytes, bool]],
) -> AsyncIterator[tuple[ScriptedHTTP, int]]:
    """Answers request number N with script(N): the bytes to send, and whether to close after."""
    seen = ScriptedHTTP()
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        seen.connections += 1
        try:
            while True:
                try:
                    request = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if not seen.first_request:
                    seen.first_request = request
                number = seen.requests
                seen.requests += 1
                data, close = script(number)
                writer.write(data)
                await writer.drain()
                if close:
                    return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield seen, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*handlers, return_exceptions=True)


async def test_http_mode_asks_again_on_the_same_connection(binaries: None) -> None:
    """-k sends GET PATH over HTTP/1.1 and keeps each connection for the next request."""
    async with scripted_http_server(lambda _: (http_response(POEM), False)) as (seen, port):
        result = await run_loadgen_async(
            "-k", "/poem.txt", "-n", 100, "-c", 4, "-b", len(POEM), "127.0.0.1", port
        )
    assert result["mode"] == "http"
    assert (result["started"], result["fetches"], result["errors"]) == (100, 100, 0)
    assert result["connections"] == seen.connections == 4
    assert seen.requests == 100
    assert seen.first_request.startswith(b"GET /poem.txt HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_http_mode_counts_each_kind_of_response(binaries: None) -> None:
    """Non-2xx, chunked, cut short, Connection: close and read-to-close are each counted once."""

    def script(number: int) -> tuple[bytes, bool]:
        kind = number % 6
        if kind == 1:
            return http_response(b"not here\n", "404 Not Found"), False
        if kind == 2:
            return http_response(POEM, headers="Connection: close\r\n"), True
        if kind == 3:
            chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(POEM), POEM)
            return http_response(
                chunked, headers="Transfer-Encoding: chunked\r\n", length=False
            ), True
        if kind == 4:  # promises the whole poem, sends half, and closes
            return http_response(POEM)[: -len(POEM) // 2], True
        if kind == 5:  # no Content-Length: the body ends when the connection does
            return http_response(POEM, length=False), True
        return http_response(POEM), False

    async with scripted_http_server(script) as (seen, port):
        result = await run_loadgen_async(
            "-k", "/", "-n", 60, "-c", 1, "-b", len(POEM), "127.0.0.1", port
        )
    assert seen.requests == 60
    assert result["fetches"] == 30  # kinds 0, 2 and 5
    assert result["error_kinds"] == error_kinds(http_status=10, bad_response=10)
    assert result["mismatch_kinds"] == {"short": 10, "long": 0}
    assert outcomes(result) == result["started"] == 60
    # Kinds 1 to 5 each end their connection, so every six requests take five.
    assert result["connections"] == seen.connections == 50


def test_http_mode_is_not_hold_mode(binaries: None) -> None:
    """-k and -H together, or a -k path without its leading slash, are usage errors."""
    for args in (["-H", "-k", "/"], ["-k", "poem.txt"]):
        done = subprocess.run(
            [str(LOADGEN), *args, "127.0.0.1", "1"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert done.returncode == 2, args
        assert "usage:" in done.stderr


def run_bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    """bench/run.py with tiny windows; its results JSON and its tables."""
    output = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            *("--rounds", "1", "--duration", "0.5", "--warmup", "0", "--starts", "0"),
            *("--no-cli", "--no-hold", "--output", str(output), *args),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results: dict[str, Any] = json.loads(output.read_text())
    return results, done.stdout


@pytest.mark.timeout(240)
def test_run_py_new_rows_smoke(binaries: None, tmp_path: Path) -> None:
    """The proxy, reload, workers and web rows run end to end; `tend web` waits if absent."""
    results, tables = run_bench(
        tmp_path,
        *("--only", "tend-proxy,tend-proxy-miss,reload,tend-uvloop-shared,web"),
        *("--reload-duration", "2", "--reload-interval", "0.5", "--miss-delay", "0.01"),
    )
    servers = results["servers"]
    measured = ["tend-proxy", "tend-proxy-miss", "tend-steady", "tend-reload", "tend-uvloop-shared"]
    for name in measured:
        summary = servers[name]["summary"]
        assert summary["errors"] == 0, (name, summary["failures"])
        assert summary["cpu_us_per_fetch"]["n"] == 1
    # Clients that arrive during a fetch share it: far fewer upstream fetches than clients.
    assert servers["tend-proxy-miss"]["summary"]["upstream_per_client"]["median"] < 0.5
    reloads = servers["tend-reload"]["summary"]["reloads"]
    assert reloads["asked"] >= 3
    assert reloads["done"] == reloads["asked"], reloads["failed"]
    assert "reloads" not in servers["tend-steady"]["summary"]
    if (BENCH / ".venv" / "bin" / "twistd").exists():
        for name in ("http.server-2k", "twistd-web-1m"):
            summary = servers[name]["summary"]
            assert summary["errors"] == 0, (name, summary["failures"])
            assert summary["requests_per_connection"]["median"] > 1  # keep-alive held
    for title in (
        "### The proxy, serving from its cache",
        "### The proxy on a cache miss",
        "### Reload under load",
        "### Workers: one and two",
        "### Static files over HTTP/1.1 keep-alive",
    ):
        assert title in tables
    assert "### Throughput" not in tables  # no poetry rows were asked for
    has_web = subprocess.run(
        [str(Path(sys.executable).parent / "tend"), "web", "--help"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if has_web.returncode == 0:
        assert "| tend-web-2k |" in tables
    else:
        assert "tend-web-2k, tend-web-1m skipped: tend has no web plugin yet" in tables


@pytest.mark.timeout(240)
def test_run_py_twistd_proxy_smoke(binaries: None, tmp_path: Path) -> None:
    """The tutorial's proxy under twistd caches, and with --no-cache fetches for every client."""
    if not (BENCH / ".venv" / "bin" / "twistd").exists():
        pytest.skip("needs bench/.venv with Twisted: make -C bench venv")
    results, tables = run_bench(
        tmp_path, "--only", "twistd-proxy,twistd-proxy-miss", "--miss-delay", "0.01"
    )
    servers = results["servers"]
    for name in ("twistd-proxy", "twistd-proxy-miss"):
        assert servers[name]["summary"]["errors"] == 0
    # The cached proxy fetched once, for run.py's first client, and never again.
    assert servers["twistd-proxy"]["summary"]["upstream_per_client"]["max"] < 0.01
    per_client = servers["twistd-proxy-miss"]["summary"]["upstream_per_client"]["median"]
    assert 0.9 <= per_client <= 1.05
    assert "| twistd-proxy-miss |" in tables


def test_chart_draws_every_measured_row(tmp_path: Path) -> None:
    """bench/chart.py turns run.py's results into an SVG naming each row it has figures for."""
    python = BENCH / ".venv" / "bin" / "python"
    if not (BENCH / ".venv" / ".chart-installed").exists():
        pytest.skip("needs matplotlib in bench/.venv: make -C bench venv")

    def spread(value: float) -> dict[str, float]:
        return {"median": value, "min": value * 0.9, "max": value * 1.1, "n": 3}

    def row(cpu: float, rate: float) -> dict[str, Any]:
        return {"summary": {"cpu_us_per_fetch": spread(cpu), "fetches_per_s": spread(rate)}}

    results = {
        "meta": {
            "date": "2026-12-01 12:00 UTC",
            "cpus": 2,
            "cpu": "a test CPU",
            "python": "3.11",
            "tend": "0.2.0",
            "twisted": "26.10.0",
            "git": "abc1234",
        },
        "settings": {"rounds": 3},
        "servers": {
            "tend-uvloop": row(20.0, 50000),
            "twistd": row(47.0, 21000),
            "twistd-proxy": row(70.0, 12000),
            "twistd-web-2k": row(200.0, 4800),
            "tend-web-2k": {"samples": []},  # skipped: no summary, no bar
        },
    }
    source = tmp_path / "results.json"
    source.write_text(json.dumps(results))
    chart = tmp_path / "chart.svg"
    done = subprocess.run(
        [
            str(python),
            str(BENCH / "chart.py"),
            str(source),
            str(chart),
            "--png",
            str(tmp_path / "c.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    svg = chart.read_text()
    for name in ("tend-uvloop", "twistd", "twistd-proxy", "twistd-web-2k"):
        assert f">{name}<" in svg
    assert ">tend-web-2k<" not in svg
    assert "tend not measured in this run" in svg
    assert (tmp_path / "c.png").stat().st_size > 0
