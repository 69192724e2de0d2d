"""The poetry client: the `get-poetry` command and the `get_poetry()` library call."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from conftest import POEM, TEND, Tend, shim_proxy_plugin

import tend
import tend.poetry
from tend.poetry.client import PoetryError, Server, get_poetry, parse_address

REPO = Path(__file__).resolve().parent.parent
TYGER = REPO / "src" / "tend" / "poetry" / "poems" / "tyger.txt"
SCRIPT = Path(sys.executable).parent / "get-poetry"
GET_POETRY = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "tend.poetry.client"]
FOREGROUND = ["--nodaemon", "--pidfile", ""]
LOCAL = ["--port", "0", "--iface", "127.0.0.1"]

Handler = Callable[[asyncio.StreamWriter], Awaitable[None]]


class PoemServer:
    """A poetry server in the test's event loop, serving each connection with *handler*."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self.served = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.append(writer)
        try:
            await self.handler(writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self.served.set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(self._handlers)
        await self._server.wait_closed()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[PoemServer]]]:
    """Start in-loop poetry servers; close them and their connections at the end."""
    started: list[PoemServer] = []

    async def start(handler: Handler) -> PoemServer:
        server = PoemServer(handler)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


def sends(poem: bytes, after: asyncio.Event | None = None) -> Handler:
    """A handler that sends *poem* (once *after* is set) and closes cleanly."""

    async def handler(writer: asyncio.StreamWriter) -> None:
        if after is not None:
            await after.wait()
        writer.write(poem)
        await writer.drain()

    return handler


async def cuts(writer: asyncio.StreamWriter) -> None:
    writer.write(POEM.read_bytes()[:1000])
    await writer.drain()
    tend.reset(writer.transport)


async def sends_nothing(writer: asyncio.StreamWriter) -> None:
    pass


async def get_poetry_command(*args: str, cwd: Path) -> tuple[int, bytes, str]:
    """Run get-poetry without blocking the loop the test's servers run in."""
    process = await asyncio.create_subprocess_exec(
        *GET_POETRY,
        *args,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out, err.decode()


SUMMARY = r"Task {n}: {size} bytes of poetry from {address} in \d+\.\d\d s"


# -- the command ------------------------------------------------------------------------------


async def test_fetches_from_every_server_at_once_and_prints_in_argument_order(
    serve: Callable[[Handler], Awaitable[PoemServer]], tmp_path: Path
) -> None:
    """The first server answers only after the second has finished: fetches are concurrent.

    A client fetching one server after the other would wait on the first forever (until
    its timeout); get-poetry gets both, and prints the poems in the order given.
    """
    second = await serve(sends(TYGER.read_bytes()))
    first = await serve(sends(POEM.read_bytes(), after=second.served))
    status, out, err = await get_poetry_command(
        "--timeout", "30", f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}", cwd=tmp_path
    )
    assert status == 0, err
    assert out == POEM.read_bytes() + TYGER.read_bytes()
    lines = err.splitlines()
    assert len(lines) == 2
    assert any(
        re.fullmatch(SUMMARY.format(n=1, size=2807, address=f"127.0.0.1:{first.port}"), line)
        for line in lines
    ), err
    assert any(
        re.fullmatch(SUMMARY.format(n=2, size=806, address=f"127.0.0.1:{second.port}"), line)
        for line in lines
    ), err


async def test_output_dir_is_created_with_a_file_per_server(
    serve: Callable[[Handler], Awaitable[PoemServer]], tmp_path: Path
) -> None:
    """--output-dir DIR (made if missing) gets HOST_PORT.txt per poem; stdout stays empty."""
    donne = await serve(sends(POEM.read_bytes()))
    blake = await serve(sends(TYGER.read_bytes()))
    out_dir = tmp_path / "poems" / "today"
    status, out, err = await get_poetry_command(
        "--output-dir",
        str(out_dir),
        f"127.0.0.1:{donne.port}",
        f"127.0.0.1:{blake.port}",
        cwd=tmp_path,
    )
    assert (status, out) == (0, b""), err
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(
        [f"127.0.0.1_{donne.port}.txt", f"127.0.0.1_{blake.port}.txt"]
    )
    assert (out_dir / f"127.0.0.1_{donne.port}.txt").read_bytes() == POEM.read_bytes()
    assert (out_dir / f"127.0.0.1_{blake.port}.txt").read_bytes() == TYGER.read_bytes()
    assert len(err.splitlines()) == 2


async def test_each_failure_is_reported_per_server_and_the_exit_status_is_1(
    serve: Callable[[Handler], Awaitable[PoemServer]], tmp_path: Path
) -> None:
    """Refused, cut, empty and silent servers each get their reason; the good poem prints."""
    good = await serve(sends(POEM.read_bytes()))
    cut = await serve(cuts)
    empty = await serve(sends_nothing)
    never = asyncio.Event()
    silent = await serve(sends(b"too late", after=never))
    with socket.socket() as refusing:  # bound but not listening: connections are refused
        refusing.bind(("127.0.0.1", 0))
        refused_port = refusing.getsockname()[1]
        status, out, err = await get_poetry_command(
            "--timeout",
            "0.3",
            f"127.0.0.1:{good.port}",
            f"127.0.0.1:{refused_port}",
            f"127.0.0.1:{cut.port}",
            f"127.0.0.1:{empty.port}",
            f"127.0.0.1:{silent.port}",
            cwd=tmp_path,
        )
    never.set()
    assert status == 1
    assert out == POEM.read_bytes()  # and not a byte of the cut poem
    lines = sorted(err.splitlines())
    assert len(lines) == 5, err
    assert re.fullmatch(SUMMARY.format(n=1, size=2807, address=f"127.0.0.1:{good.port}"), lines[0])
    assert (
        lines[1]
        == f"Task 2: failed to get poetry from 127.0.0.1:{refused_port}: connection refused"
    )
    assert re.fullmatch(
        rf"Task 3: failed to get poetry from 127\.0\.0\.1:{cut.port}: connection reset "
        r"(after \d+ bytes: the poem was cut short|before any poetry arrived)",
        lines[2],
    )
    assert lines[3] == (
        f"Task 4: failed to get poetry from 127.0.0.1:{empty.port}: "
        "the server closed the connection without sending poetry"
    )
    assert lines[4] == (
        f"Task 5: failed to get poetry from 127.0.0.1:{silent.port}: "
        "timed out after 0.3 s (0 bytes received)"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: HOST:PORT"),
        (["localhost:poems"], "argument HOST:PORT: invalid address 'localhost:poems'"),
        (["::1:10000"], "write an IPv6 host in brackets, as [::1]:10000"),
        (["70000"], "the port must be a number from 1 to 65535"),
        (
            ["\u202e:1"],
            "invalid address '\\u202e:1': '\\u202e' is not a host name (letters, digits and "
            "hyphens) or an IP address",
        ),
        (["[:10"], "invalid address '[:10': '[' is not a host name"),
        (["a..b:1"], "invalid address 'a..b:1': 'a..b' is not a host name"),
        (["poems_example:1"], "'poems_example' is not a host name"),
        ([f"{'a' * 64}.example:1"], "is not a host name"),
        ([f"{'a.' * 130}example:1"], "is longer than 253 characters"),
        (["999.1.1.1:10000"], "invalid address '999.1.1.1:10000': '999.1.1.1' is not a valid IP"),
        (["[localhost]:1"], "'localhost' is not an IPv6 address: brackets are for IPv6"),
        (["[127.0.0.1]:1"], "'127.0.0.1' is not an IPv6 address"),
        (["--timeout", "0", "10000"], "argument --timeout: invalid duration '0'"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    """A bad address or timeout is reported by argparse, naming the argument (exit 2), in
    one line and a hint."""
    result = subprocess.run(
        [*GET_POETRY, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 2, result.stderr
    assert result.stdout == ""


def localhost_is_only_127_0_0_1() -> bool:
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)}
    return addresses == {"127.0.0.1"}


@pytest.mark.skipif(
    not localhost_is_only_127_0_0_1(), reason="tests talk to 127.0.0.1 only; localhost is more"
)
def test_a_bare_port_means_localhost(run_tend: Callable[..., Tend], tmp_path: Path) -> None:
    """`get-poetry PORT` fetches from localhost, and names the file localhost_PORT.txt."""
    server = run_tend(*FOREGROUND, "poetry", *LOCAL)
    port = server.wait_for_port()
    result = subprocess.run(
        [*GET_POETRY, "--output-dir", "out", str(port)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / f"localhost_{port}.txt").read_bytes() == POEM.read_bytes()
    assert re.fullmatch(
        SUMMARY.format(n=1, size=2807, address=f"localhost:{port}") + "\n", result.stderr
    )
    assert server.stop() == 0


# -- the library call -------------------------------------------------------------------------


async def test_get_poetry_is_a_library_call(run_tend: Callable[..., Tend]) -> None:
    """`await tend.poetry.get_poetry(host, port, timeout=)` returns the poem from a real tend."""
    assert tend.poetry.get_poetry is get_poetry
    server = run_tend(*FOREGROUND, "poetry", *LOCAL)
    port = server.wait_for_port()
    assert await get_poetry("127.0.0.1", port, timeout=10) == POEM.read_bytes()
    assert server.stop() == 0


async def test_get_poetry_raises_poetry_error_for_a_cut_poem(
    serve: Callable[[Handler], Awaitable[PoemServer]],
) -> None:
    """A reset is an error, not a short poem; the error says how much had arrived."""
    cut = await serve(cuts)
    with pytest.raises(PoetryError) as caught:
        await get_poetry("127.0.0.1", cut.port)
    assert caught.value.address == f"127.0.0.1:{cut.port}"
    assert caught.value.reason.startswith("connection reset")
    assert str(caught.value).startswith(f"cannot get poetry from 127.0.0.1:{cut.port}: ")
    # `received` is the bytes themselves, as the README says: the start of the poem.
    received = caught.value.received
    assert isinstance(received, bytes)
    assert received == POEM.read_bytes()[: len(received)]
    assert f"after {len(received)} bytes" in caught.value.reason or not received


async def test_get_poetry_raises_poetry_error_on_timeout(
    serve: Callable[[Handler], Awaitable[PoemServer]],
) -> None:
    """The timeout bounds the whole fetch."""
    never = asyncio.Event()
    silent = await serve(sends(b"", after=never))
    with pytest.raises(PoetryError) as caught:
        await get_poetry("127.0.0.1", silent.port, timeout=0.1)
    never.set()
    assert caught.value.reason == "timed out after 0.1 s (0 bytes received)"
    assert caught.value.received == b""


@pytest.mark.parametrize(
    ("text", "server"),
    [
        ("10000", Server("localhost", 10000)),
        ("poems.example:10001", Server("poems.example", 10001)),
        ("127.0.0.1:1", Server("127.0.0.1", 1)),
        ("[::1]:10000", Server("::1", 10000)),
        ("[fe80::1%eth0]:10000", Server("fe80::1%eth0", 10000)),
        ("café.example:10000", Server("café.example", 10000)),
        ("poems-1.example.:10000", Server("poems-1.example.", 10000)),
        ("10.0.0.1:10000", Server("10.0.0.1", 10000)),
    ],
)
def test_addresses_parse(text: str, server: Server) -> None:
    """HOST:PORT, [IPV6]:PORT and a bare PORT; str() gives the address back as typed."""
    assert parse_address(text) == server
    assert str(server) == (text if ":" in text else f"localhost:{text}")


def test_a_port_of_zero_is_not_an_address() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_address("localhost:0")


async def test_get_poetry_turns_a_host_the_resolver_cannot_take_into_poetry_error() -> None:
    """The library call validates nothing itself: an odd host is still a PoetryError."""
    with pytest.raises(PoetryError) as caught:
        await get_poetry("\u202e", 1, timeout=5)
    assert caught.value.reason.startswith("invalid host '\\u202e': ")


def test_get_poetry_reports_every_failure_in_one_line_without_a_traceback(
    tmp_path: Path,
) -> None:
    """Refused, unroutable and odd-but-valid hosts: a line each, never a traceback."""
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{refusing.getsockname()[1]}"
        result = subprocess.run(
            [*GET_POETRY, "--timeout", "0.5", refused, "[::1]:1", "[fe80::1%lo]:1"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    assert all(re.fullmatch(r"Task \d: failed to get poetry from \S+: .+", line) for line in lines)
    assert "Traceback" not in result.stderr
    assert "ExceptionGroup" not in result.stderr


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ("\u202e:1", "argument --server: invalid address '\\u202e:1': '\\u202e' is not a host"),
        ("[:10", "argument --server: invalid address '[:10': '[' is not a host name"),
    ],
)
def test_the_proxy_refuses_an_odd_upstream_at_once(
    tmp_path: Path, server: str, message: str
) -> None:
    """poetry-proxy --server with an odd host does not start: a usage error (exit 2)."""
    shim_proxy_plugin(tmp_path)
    result = subprocess.run(
        [*TEND, "--nodaemon", "--pidfile", "", "poetry-proxy", "--server", server],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "folder",
    [f"a/b/{'x' * 300}", "/".join(["y" * 200] * 25)],
    ids=["name-too-long", "path-too-long"],
)
def test_an_output_dir_that_cannot_be_made_leaves_nothing_behind(
    tmp_path: Path, folder: str
) -> None:
    """A folder name, or a whole path, too long: one line, exit 1, and none of the folders
    made before the failure is left behind."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "a").mkdir()  # there before: stays
    result = subprocess.run(
        [*GET_POETRY, "--output-dir", folder, "10000"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("get-poetry: cannot create output directory '")
    assert result.stderr.endswith("': File name too long\n")
    assert len(result.stderr.splitlines()) == 1
    assert sorted(path.name for path in work.iterdir()) == ["a"]
    assert list((work / "a").iterdir()) == []
