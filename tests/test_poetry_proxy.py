"""The poetry proxy, run for real: one upstream fetch shared, a cache, and failures.

The upstream is usually a poetry server in the test's own event loop, so that a test can
hold the poem back, cut it, or count the connections the proxy makes. The poetry protocol
ends a poem with a clean end-of-file, so a reset is the only way the proxy can tell its
clients "there is no poem": these tests check for a reset, and for no bytes before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import POEM, TEND, Tend, fetch, shim_proxy_plugin, wait_until, wait_until_async

import tend
from tend.poetry.proxy import PoetryProxyFactory, ProxyService

REPO = Path(__file__).resolve().parent.parent
PROXY_APP = REPO / "examples" / "poetry_proxy.py"
FOREGROUND = ["--nodaemon", "--pidfile", ""]
LOCAL = ["--port", "0", "--iface", "127.0.0.1"]

Behaviour = Callable[["Upstream", int, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A poetry server in the test's event loop that counts connections and does as told."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.release = asyncio.Event()
        self.port = 0
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
        self.connections += 1
        self._writers.append(writer)
        try:
            await self.behaviour(self, self.connections, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        self.release.set()
        for writer in self._writers:
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(self._handlers)
        await self._server.wait_closed()


async def send_poem(upstream: Upstream, number: int, writer: asyncio.StreamWriter) -> None:
    writer.write(POEM.read_bytes())
    await writer.drain()


async def hold_then_send(upstream: Upstream, number: int, writer: asyncio.StreamWriter) -> None:
    await upstream.release.wait()
    await send_poem(upstream, number, writer)


async def cut_first(upstream: Upstream, number: int, writer: asyncio.StreamWriter) -> None:
    """The first fetch gets half the poem and a reset, once released; later ones all of it."""
    if number > 1:
        await send_poem(upstream, number, writer)
        return
    await upstream.release.wait()
    writer.write(POEM.read_bytes()[:1000])
    await writer.drain()
    tend.reset(writer.transport)


async def send_nothing(upstream: Upstream, number: int, writer: asyncio.StreamWriter) -> None:
    pass  # close at once, cleanly, without a poem


async def never_send(upstream: Upstream, number: int, writer: asyncio.StreamWriter) -> None:
    await upstream.release.wait()  # until the test ends


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[Behaviour], Awaitable[Upstream]]]:
    """Start in-loop upstream servers; close them, and their connections, at the end."""
    started: list[Upstream] = []

    async def start(behaviour: Behaviour) -> Upstream:
        server = Upstream(behaviour)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


async def port_of(process: Tend) -> int:
    def look() -> re.Match[str] | None:
        if process.exited:
            raise AssertionError(f"tend exited:\n{process.output}")
        return re.search(r"starting on (\d+)", process.stdout)

    match = await wait_until_async(look)
    assert isinstance(match, re.Match)
    return int(match.group(1))


def count(process: Tend, text: str) -> int:
    return process.stdout.count(text)


async def attempt(port: int) -> tuple[bytes, str]:
    """Fetch through the proxy: what arrived, and how it ended ("eof" or "reset")."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionResetError:
        return b"", "reset"  # the reset came before this side saw the connection complete
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
        ending = "eof"
    except ConnectionResetError:
        ending = "reset"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return data, ending


def start_proxy(
    run_tend: Callable[..., Tend],
    tmp_path: Path,
    upstream_port: int,
    *extra: str,
    loop: str = "asyncio",
) -> Tend:
    shim_proxy_plugin(tmp_path)
    return run_tend(
        *FOREGROUND,
        "--loop",
        loop,
        "poetry-proxy",
        *LOCAL,
        "--server",
        f"127.0.0.1:{upstream_port}",
        *extra,
    )


WHOLE = (POEM.read_bytes(), "eof")
NOTHING = (b"", "reset")


def until_whole(port: int) -> Callable[[], Awaitable[bool]]:
    """A wait_until_async predicate: fetch through the proxy until a whole poem comes.

    Fetches before then are reset (during the back-off after a failure), never short.
    """

    async def whole() -> bool:
        outcome = await attempt(port)
        assert outcome in (WHOLE, NOTHING)
        return outcome == WHOLE

    return whole


def until_fetches(port: int, up: Upstream, fetches: int) -> Callable[[], Awaitable[bool]]:
    """A wait_until_async predicate: try the proxy until the upstream has seen *fetches*."""

    async def fetched() -> bool:
        assert await attempt(port) == NOTHING
        assert up.connections <= fetches
        return up.connections == fetches

    return fetched


# -- one fetch, shared, then cached -----------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_fifty_clients_at_once_share_one_upstream_fetch(
    run_tend: Callable[..., Tend],
    tmp_path: Path,
    upstream: Callable[..., Awaitable[Upstream]],
    loop: str,
) -> None:
    """Fifty clients arrive while the fetch is in flight: the upstream sees one connection."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    up = await upstream(hold_then_send)
    proxy = start_proxy(run_tend, tmp_path, up.port, loop=loop)
    port = await port_of(proxy)
    clients = [asyncio.ensure_future(attempt(port)) for _ in range(50)]
    await wait_until_async(
        lambda: (
            count(proxy, "proxying poem from") == 1
            and count(proxy, "waits for the poem already on its way") == 49
        )
    )
    assert up.connections == 1
    up.release.set()
    assert await asyncio.gather(*clients) == [WHOLE] * 50
    assert up.connections == 1
    await wait_until_async(
        lambda: count(proxy, f"fetched 2807 bytes of poetry from 127.0.0.1:{up.port}") == 1
    )
    # Later clients get the cached poem at once.
    assert await attempt(port) == WHOLE
    await wait_until_async(lambda: "serving cached poem to 127.0.0.1:" in proxy.stdout)
    assert up.connections == 1
    assert proxy.stop() == 0


def test_the_cache_outlives_the_upstream(run_tend: Callable[..., Tend], tmp_path: Path) -> None:
    """Once fetched, the poem is served even after the upstream server has stopped."""
    server = run_tend(*FOREGROUND, "poetry", *LOCAL)
    proxy = start_proxy(run_tend, tmp_path, server.wait_for_port())
    port = proxy.wait_for_port()
    assert fetch(port) == POEM.read_bytes()
    assert server.stop() == 0
    assert fetch(port) == POEM.read_bytes()
    assert fetch(port) == POEM.read_bytes()
    wait_until(lambda: count(proxy, "serving cached poem to") == 2)
    assert count(proxy, "proxying poem from") == 1
    assert proxy.stop() == 0


async def test_a_client_that_leaves_while_waiting_costs_nothing(
    run_tend: Callable[..., Tend], tmp_path: Path, upstream: Callable[..., Awaitable[Upstream]]
) -> None:
    """A waiting client that hangs up is logged; the fetch goes on for the next client."""
    up = await upstream(hold_then_send)
    proxy = start_proxy(run_tend, tmp_path, up.port)
    port = await port_of(proxy)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    await wait_until_async(lambda: "proxying poem from" in proxy.stdout)
    writer.close()
    await writer.wait_closed()
    await wait_until_async(lambda: "left before the poem arrived" in proxy.stdout)
    second = asyncio.ensure_future(attempt(port))
    await wait_until_async(lambda: "waits for the poem already on its way" in proxy.stdout)
    up.release.set()
    assert await second == WHOLE
    assert up.connections == 1
    assert proxy.stop() == 0
    assert "Traceback" not in proxy.stdout


# -- failures: nothing partial is sent, nothing is cached, the next client retries ------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_a_poem_cut_by_a_reset_is_not_cached_or_sent(
    run_tend: Callable[..., Tend],
    tmp_path: Path,
    upstream: Callable[..., Awaitable[Upstream]],
    loop: str,
) -> None:
    """The upstream resets mid-poem: every waiting client is reset with no bytes at all."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    up = await upstream(cut_first)
    proxy = start_proxy(run_tend, tmp_path, up.port, loop=loop)
    port = await port_of(proxy)
    clients = [asyncio.ensure_future(attempt(port)) for _ in range(5)]
    await wait_until_async(lambda: count(proxy, "waits for the poem already on its way") == 4)
    up.release.set()
    assert await asyncio.gather(*clients) == [NOTHING] * 5
    await wait_until_async(
        lambda: re.search(
            rf"cannot fetch poem from 127\.0\.0\.1:{up.port}: connection reset", proxy.stdout
        )
    )
    await wait_until_async(lambda: count(proxy, "resetting the connection to 127.0.0.1:") == 5)
    # After the back-off the next client tries the upstream again, and gets the whole poem.
    await wait_until_async(until_whole(port))
    assert up.connections == 2
    assert proxy.stop() == 0


@pytest.mark.parametrize(
    ("behaviour", "extra", "reason"),
    [
        (send_nothing, [], "the server closed the connection without sending poetry"),
        (never_send, ["--timeout", "0.2"], "timed out after 0.2 s (0 bytes received)"),
    ],
    ids=["sends-nothing", "times-out"],
)
async def test_an_upstream_failure_resets_the_client_and_the_next_one_retries(
    run_tend: Callable[..., Tend],
    tmp_path: Path,
    upstream: Callable[..., Awaitable[Upstream]],
    behaviour: Behaviour,
    extra: list[str],
    reason: str,
) -> None:
    """An upstream that sends nothing or times out: logged with the reason, client reset;
    after the back-off a client makes the proxy try again."""
    up = await upstream(behaviour)
    proxy = start_proxy(run_tend, tmp_path, up.port, *extra)
    port = await port_of(proxy)
    assert await attempt(port) == NOTHING
    await wait_until_async(
        lambda: (
            f"cannot fetch poem from 127.0.0.1:{up.port}: {reason}; the next fetch in 0.5 s"
            in proxy.stdout
        )
    )
    await wait_until_async(until_fetches(port, up, 2))
    assert proxy.stop() == 0


async def test_a_refusing_upstream_resets_the_client(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """Nothing listens upstream: the refusal is logged, each client reset, and retried
    after the back-off."""
    with socket.socket() as bound:  # bound but not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        proxy = start_proxy(run_tend, tmp_path, bound.getsockname()[1])
        port = await port_of(proxy)

        async def refused_twice() -> bool:
            assert await attempt(port) == NOTHING
            return count(proxy, "connection refused; the next fetch in") == 2

        await wait_until_async(refused_twice)
        assert count(proxy, "proxying poem from") == 2
        assert "connection refused; the next fetch in 1.0 s" in proxy.stdout
        assert proxy.stop() == 0


# -- the back-off after a failure: one upstream attempt per back-off, not per client -----------


async def reset_at_once(upstream: Upstream, number: int, writer: asyncio.StreamWriter) -> None:
    tend.reset(writer.transport)


async def hold_then_reset(upstream: Upstream, number: int, writer: asyncio.StreamWriter) -> None:
    await upstream.release.wait()
    tend.reset(writer.transport)


@contextlib.asynccontextmanager
async def proxy_in_loop(upstream_port: int, **options: Any) -> AsyncIterator[int]:
    """A poetry proxy in the test's own event loop, with *options* for its ProxyService."""
    service = ProxyService("127.0.0.1", upstream_port, **options)
    listener = tend.StreamServer(
        "tcp:0:interface=127.0.0.1", PoetryProxyFactory(service), armed=True
    )
    tree = tend.MultiService()
    service.set_service_parent(tree)
    listener.set_service_parent(tree)
    tree.privileged_start_service()
    await tree.start_service()
    try:
        assert listener.port is not None
        yield listener.port
    finally:
        listener.grace_period = 0
        await tree.stop_service()


def proxy_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "tend.poetry.proxy" and text in record.getMessage()
    ]


async def test_every_client_waiting_for_a_failed_fetch_is_reset_by_that_one_failure(
    upstream: Callable[..., Awaitable[Upstream]], caplog: pytest.LogCaptureFixture
) -> None:
    """Twenty clients wait for one fetch; the upstream resets it: all twenty are reset."""
    caplog.set_level(logging.INFO, logger="tend.poetry")
    up = await upstream(hold_then_reset)
    async with proxy_in_loop(up.port) as port:
        clients = [asyncio.ensure_future(attempt(port)) for _ in range(20)]
        await wait_until_async(
            lambda: len(proxy_lines(caplog, "waits for the poem already on its way")) == 19
        )
        up.release.set()
        assert await asyncio.gather(*clients) == [NOTHING] * 20
    assert up.connections == 1
    assert len(proxy_lines(caplog, "cannot fetch poem from")) == 1


async def test_clients_during_the_back_off_are_reset_at_once_and_told_when(
    upstream: Callable[..., Awaitable[Upstream]], caplog: pytest.LogCaptureFixture
) -> None:
    """After a failure, 200 clients at once: no upstream connection, each reset at once
    with a line saying when the next attempt is (here, with a back-off of an hour)."""
    caplog.set_level(logging.INFO, logger="tend.poetry")
    up = await upstream(reset_at_once)
    async with proxy_in_loop(up.port, retry_backoff=3600.0, retry_backoff_max=3600.0) as port:
        assert await attempt(port) == NOTHING
        await wait_until_async(lambda: proxy_lines(caplog, "cannot fetch poem from"))
        outcomes = await asyncio.gather(*(attempt(port) for _ in range(200)))
    assert outcomes == [NOTHING] * 200
    assert up.connections == 1
    told = proxy_lines(caplog, "the next attempt is in")
    assert len(told) == 200
    assert re.fullmatch(
        rf"resetting the connection to 127\.0\.0\.1:\d+: the last fetch from "
        rf"127\.0\.0\.1:{up.port} failed: connection reset before any poetry arrived; "
        r"the next attempt is in 3[56]\d\d\.\d s",
        told[0],
    )
    assert proxy_lines(caplog, "cannot fetch poem from") == [
        f"cannot fetch poem from 127.0.0.1:{up.port}: connection reset before any poetry "
        "arrived; the next fetch in 3600.0 s"
    ]


async def test_the_back_off_doubles_with_each_failure_in_a_row_up_to_its_ceiling(
    upstream: Callable[..., Awaitable[Upstream]], caplog: pytest.LogCaptureFixture
) -> None:
    """0.1 s after the first failure, then 0.2, 0.4, and no more than the ceiling of 0.4."""
    caplog.set_level(logging.INFO, logger="tend.poetry")
    up = await upstream(reset_at_once)
    async with proxy_in_loop(up.port, retry_backoff=0.1, retry_backoff_max=0.4) as port:
        for fetches in (1, 2, 3, 4):
            await wait_until_async(until_fetches(port, up, fetches))
        await wait_until_async(lambda: len(proxy_lines(caplog, "cannot fetch poem from")) == 4)
    waits = [line.rsplit(" in ", 1)[1] for line in proxy_lines(caplog, "cannot fetch poem")]
    assert waits == ["0.1 s", "0.2 s", "0.4 s", "0.4 s"]


async def test_a_whole_poem_ends_the_back_off(
    upstream: Callable[..., Awaitable[Upstream]], caplog: pytest.LogCaptureFixture
) -> None:
    """After a success, the next failure waits the first back-off again, not a doubled one."""
    caplog.set_level(logging.INFO, logger="tend.poetry")
    outcomes = iter([reset_at_once, send_poem, reset_at_once])

    async def next_outcome(up: Upstream, number: int, writer: asyncio.StreamWriter) -> None:
        await next(outcomes)(up, number, writer)

    up = await upstream(next_outcome)
    async with proxy_in_loop(up.port, retry_backoff=0.1, cache_ttl=0) as port:
        assert await attempt(port) == NOTHING
        await wait_until_async(until_whole(port))
        await wait_until_async(until_fetches(port, up, 3))
        await wait_until_async(lambda: len(proxy_lines(caplog, "cannot fetch poem from")) == 2)
    waits = [line.rsplit(" in ", 1)[1] for line in proxy_lines(caplog, "cannot fetch poem")]
    assert waits == ["0.1 s", "0.1 s"]


async def test_a_real_proxy_tells_a_client_during_the_back_off_when_it_will_try_again(
    run_tend: Callable[..., Tend], tmp_path: Path, upstream: Callable[..., Awaitable[Upstream]]
) -> None:
    """The plugin backs off too: a client during the back-off is reset at once, told when."""
    up = await upstream(reset_at_once)
    proxy = start_proxy(run_tend, tmp_path, up.port)
    port = await port_of(proxy)

    async def told() -> bool:
        assert await attempt(port) == NOTHING
        return "the next attempt is in" in proxy.stdout

    await wait_until_async(told)
    assert up.connections < count(proxy, "resetting the connection to")
    assert proxy.stop() == 0


# -- --max-poem-bytes ---------------------------------------------------------------------------


async def hold_then_send_8_mib(
    upstream: Upstream, number: int, writer: asyncio.StreamWriter
) -> None:
    await upstream.release.wait()
    writer.write(b"Tyger Tyger, burning bright,\n" * (8 * 1024 * 1024 // 29))
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def test_a_poem_over_max_poem_bytes_resets_its_clients_with_one_line(
    run_tend: Callable[..., Tend], tmp_path: Path, upstream: Callable[..., Awaitable[Upstream]]
) -> None:
    """An 8 MiB poem against --max-poem-bytes 1048576: the waiting clients are reset, and
    the proxy says why once."""
    up = await upstream(hold_then_send_8_mib)
    proxy = start_proxy(run_tend, tmp_path, up.port, "--max-poem-bytes", "1048576")
    port = await port_of(proxy)
    clients = [asyncio.ensure_future(attempt(port)) for _ in range(3)]
    await wait_until_async(lambda: count(proxy, "waits for the poem already on its way") == 2)
    up.release.set()
    assert await asyncio.gather(*clients) == [NOTHING] * 3
    await wait_until_async(lambda: count(proxy, "resetting the connection to") == 3)
    assert count(proxy, "cannot fetch poem from") == 1
    assert (
        f"cannot fetch poem from 127.0.0.1:{up.port}: the poem is larger than 1,048,576 bytes "
        "(--max-poem-bytes); the next fetch in 0.5 s"
    ) in proxy.stdout
    assert proxy.stop() == 0


def worker_rss_kib(tend_process: Tend) -> int:
    """The resident memory of a one-worker tend's worker (its supervisor's only child)."""
    (worker,) = (
        Path(f"/proc/{tend_process.pid}/task/{tend_process.pid}/children").read_text().split()
    )
    for line in Path(f"/proc/{worker}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {worker}")


async def test_a_huge_upstream_poem_costs_the_proxy_little_memory(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """A 64 MiB upstream poem, past the default 4 MiB: the proxy grows by far less than it."""
    big = tmp_path / "big.txt"
    big.write_bytes(b"Tyger Tyger, burning bright,\n" * (64 * 1024 * 1024 // 29))
    server = run_tend(
        *FOREGROUND, "poetry", *LOCAL, "--poem", str(big), "--max-poem-bytes", str(128 << 20)
    )
    proxy = start_proxy(run_tend, tmp_path, server.wait_for_port())
    port = await port_of(proxy)
    await wait_until_async(
        lambda: len(Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split()) == 1
    )
    before = worker_rss_kib(proxy)
    assert await attempt(port) == NOTHING
    await wait_until_async(lambda: "the poem is larger than 4,194,304 bytes" in proxy.stdout)
    grown_mib = (worker_rss_kib(proxy) - before) / 1024
    # Holding the whole poem would take 64 MiB at least (and took twice that before).
    assert grown_mib < 24, f"the proxy grew by {grown_mib:.0f} MiB"
    assert proxy.stop() == 0


# -- --cache-ttl ------------------------------------------------------------------------------


async def test_cache_ttl_zero_fetches_for_every_client(
    run_tend: Callable[..., Tend], tmp_path: Path, upstream: Callable[..., Awaitable[Upstream]]
) -> None:
    """--cache-ttl 0 disables the cache: each client (not sharing a fetch) fetches anew."""
    up = await upstream(send_poem)
    proxy = start_proxy(run_tend, tmp_path, up.port, "--cache-ttl", "0")
    port = await port_of(proxy)
    for expected in (1, 2, 3):
        assert await attempt(port) == WHOLE
        assert up.connections == expected
    assert "serving cached poem" not in proxy.stdout
    assert proxy.stop() == 0


async def test_cache_ttl_keeps_the_poem_then_lets_it_expire(
    run_tend: Callable[..., Tend], tmp_path: Path, upstream: Callable[..., Awaitable[Upstream]]
) -> None:
    """A poem older than --cache-ttl is fetched again; a long ttl keeps serving the cache."""
    up = await upstream(send_poem)
    short = start_proxy(run_tend, tmp_path, up.port, "--cache-ttl", "0.1")
    port = await port_of(short)
    assert await attempt(port) == WHOLE
    assert up.connections == 1

    async def refetched() -> bool:
        assert await attempt(port) == WHOLE
        return up.connections == 2

    await wait_until_async(refetched)  # until the cached poem has expired
    assert short.stop() == 0

    long = start_proxy(run_tend, tmp_path, up.port, "--cache-ttl", "3600")
    port = await port_of(long)
    assert await attempt(port) == WHOLE
    assert await attempt(port) == WHOLE
    assert up.connections == 3
    await wait_until_async(lambda: "serving cached poem to" in long.stdout)
    assert long.stop() == 0


# -- the plugin and the app file --------------------------------------------------------------


def test_proxy_plugin_is_listed_and_needs_a_server(tmp_path: Path) -> None:
    """`tend` lists poetry-proxy; without --server it is a usage error (exit 2)."""
    shim_proxy_plugin(tmp_path)
    listing = subprocess.run(
        TEND, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert re.search(r"^  poetry-proxy +A poetry proxy", listing.stdout, re.MULTILINE)
    missing = subprocess.run(
        [*TEND, "poetry-proxy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2
    assert "the following arguments are required: --server" in missing.stderr
    bad = subprocess.run(
        [*TEND, "poetry-proxy", "--server", "localhost:poems"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "argument --server: invalid address 'localhost:poems'" in bad.stderr


def test_proxy_app_file_serves_the_upstream_poem(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """examples/poetry_proxy.py run for real, pointed at a real poetry server."""
    server = run_tend(*FOREGROUND, "poetry", *LOCAL)
    upstream_port = server.wait_for_port()
    text = PROXY_APP.read_text()
    for old, new in (
        ("port = 10001", "port = 0"),
        ('iface = "localhost"', 'iface = "127.0.0.1"'),
        ('server_host = "localhost"', 'server_host = "127.0.0.1"'),
        ("server_port = 10000", f"server_port = {upstream_port}"),
    ):
        assert old in text
        text = text.replace(old, new)
    app = tmp_path / "poetry_proxy.py"
    app.write_text(text)
    proxy = run_tend(*FOREGROUND, "-y", str(app))
    port = proxy.wait_for_port()
    assert fetch(port) == POEM.read_bytes()
    assert fetch(port) == POEM.read_bytes()
    wait_until(lambda: count(server, "sending 2807 bytes of poetry to") == 1)
    assert proxy.stop() == 0
    assert server.stop() == 0
