"""The poetry server under tend: two poems in one app file, slow poetry, large poems."""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import POEM, Tend, fetch, wait_until

from tend.appfile import load_application
from tend.net import TCPServer
from tend.poetry.server import PoetryService
from tend.service import MultiService

REPO = Path(__file__).resolve().parent.parent
TWO_POEMS = REPO / "examples" / "two_poems.py"
TYGER = REPO / "src" / "tend" / "poetry" / "poems" / "tyger.txt"
FOREGROUND = ["--nodaemon", "--pidfile", ""]
LOCAL = ["--port", "0", "--iface", "127.0.0.1"]
MIB = 1024 * 1024


def ports_of(tend: Tend, count: int) -> list[int]:
    """Wait for *count* `starting on PORT` lines; return the ports in the order logged."""

    def look() -> list[int] | None:
        ports = [int(port) for port in re.findall(r"starting on (\d+)", tend.stdout)]
        if len(ports) < count and tend.exited:
            raise AssertionError(f"tend exited:\n{tend.stdout}\n{tend.stderr}")
        return ports if len(ports) >= count else None

    ports = wait_until(look)
    assert isinstance(ports, list)
    return ports


def count_in(tend: Tend, pattern: str) -> int:
    return len(re.findall(pattern, tend.stdout))


async def read_poem(port: int) -> bytes:
    """Fetch a poem as an asyncio client does: read to end-of-file."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def worker_of(tend: Tend) -> int:
    """The worker of a one-worker tend, which serves: its supervisor's only child."""

    def look() -> int | None:
        found = Path(f"/proc/{tend.pid}/task/{tend.pid}/children").read_text().split()
        return int(found[0]) if len(found) == 1 else None

    pid = wait_until(look)
    assert isinstance(pid, int)
    return pid


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


# -- exercise 1: two poems, two ports, one daemon -------------------------------------------


def test_two_poems_app_file_serves_each_poem_on_its_own_port(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """examples/two_poems.py run for real: Donne on the first port, Blake on the second."""
    text = TWO_POEMS.read_text()
    for old, new in (
        ("10000", "0"),
        ("10001", "0"),
        ('iface = "localhost"', 'iface = "127.0.0.1"'),
    ):
        assert old in text
        text = text.replace(old, new)
    app = tmp_path / "two_poems.py"
    app.write_text(text)
    tend = run_tend(*FOREGROUND, "-y", str(app))
    first, second = ports_of(tend, 2)
    assert fetch(first) == POEM.read_bytes()
    assert fetch(second) == TYGER.read_bytes()
    assert first != second
    assert tend.stop() == 0
    assert tend.stderr == ""


def test_two_poems_app_file_keeps_each_poem_in_its_own_multiservice() -> None:
    """Each poem's PoetryService and listener share a MultiService under one Application."""
    application = load_application(str(TWO_POEMS))
    groups = list(application)
    assert [group.name for group in groups] == ["ecstasy", "tyger"]
    for group, (poem, port) in zip(
        groups, [("ecstasy.txt", 10000), ("tyger.txt", 10001)], strict=True
    ):
        assert isinstance(group, MultiService)
        poetry, listener = list(group)
        assert isinstance(poetry, PoetryService)
        assert poetry.poetry_file.endswith(poem)
        assert isinstance(listener, TCPServer)
        assert listener.endpoint.port == port
        assert listener.protocol_factory.service is poetry  # type: ignore[attr-defined]


def test_the_tyger_is_written_out_whole() -> None:
    """Blake's poem: a title, a byline, six quatrains, the first and last nearly alike."""
    lines = TYGER.read_text().split("\n")
    assert lines[:3] == ["The Tyger", "by William Blake", ""]
    stanzas = "\n".join(lines[3:]).strip("\n").split("\n\n")
    assert [len(stanza.split("\n")) for stanza in stanzas] == [4] * 6
    assert stanzas[0].startswith("Tyger Tyger, burning bright,\nIn the forests of the night;")
    assert stanzas[-1].endswith("Dare frame thy fearful symmetry?")
    assert "Did he who made the Lamb make thee?" in stanzas[4]


# -- slow poetry ------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_slow_server_sends_every_client_the_whole_poem(
    run_tend: Callable[..., Tend], loop: str
) -> None:
    """With --chunk-size and --delay, twenty clients at once each get the poem, byte for byte."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    tend = run_tend(
        *FOREGROUND, "--loop", loop, "poetry", *LOCAL, "--chunk-size", "300", "--delay", "0.01"
    )
    (port,) = ports_of(tend, 1)
    poems = await asyncio.gather(*(read_poem(port) for _ in range(20)))
    assert poems == [POEM.read_bytes()] * 20
    assert tend.stop() == 0


async def test_slow_server_interleaves_many_clients(run_tend: Callable[..., Tend]) -> None:
    """Fifty clients are all mid-poem at once: each has its first piece, none has the rest."""
    tend = run_tend(*FOREGROUND, "poetry", *LOCAL, "--chunk-size", "100", "--delay", "3600")
    (port,) = ports_of(tend, 1)
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
    try:
        pieces = [await reader.readexactly(100) for reader, _ in connections]
        assert pieces == [POEM.read_bytes()[:100]] * 50
        assert not any(reader.at_eof() for reader, _ in connections)
    finally:
        for _, writer in connections:
            writer.close()
            await writer.wait_closed()
    # Each one that left is logged once; none of them costs a send error.
    wait_until(lambda: count_in(tend, r"closed after 100 of 2807 bytes of poetry") == 50)
    assert tend.stop() == 0
    assert "Traceback" not in tend.stdout
    assert "socket.send() raised exception" not in tend.stdout


async def test_a_client_leaving_mid_poem_does_not_disturb_the_others(
    run_tend: Callable[..., Tend],
) -> None:
    """One client hangs up after the first piece; the others still get the whole poem."""
    tend = run_tend(*FOREGROUND, "poetry", *LOCAL, "--chunk-size", "500", "--delay", "0.02")
    (port,) = ports_of(tend, 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    others = [asyncio.ensure_future(read_poem(port)) for _ in range(3)]
    try:
        assert await reader.readexactly(500) == POEM.read_bytes()[:500]
        leaver_port = writer.get_extra_info("sockname")[1]
    finally:
        writer.close()
        await writer.wait_closed()
    assert await asyncio.gather(*others) == [POEM.read_bytes()] * 3
    wait_until(
        lambda: re.search(
            rf"connection to 127\.0\.0\.1:{leaver_port} closed after \d+ of 2807 bytes",
            tend.stdout,
        )
    )
    assert tend.stop() == 0
    assert "Traceback" not in tend.stdout


def test_chunk_size_alone_sends_pieces_without_pausing(run_tend: Callable[..., Tend]) -> None:
    """--chunk-size alone sends the poem in small pieces, as fast as the client reads."""
    tend = run_tend(*FOREGROUND, "poetry", *LOCAL, "--chunk-size", "7")
    (port,) = ports_of(tend, 1)
    assert fetch(port) == POEM.read_bytes()
    assert "SlowPoetryFactory starting on" in tend.stdout
    assert tend.stop() == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_fast_path_is_the_plain_poetry_factory(
    run_tend: Callable[..., Tend], loop: str
) -> None:
    """With neither option the poem goes out at once, through the plain PoetryFactory."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    tend = run_tend(*FOREGROUND, "--loop", loop, "poetry", *LOCAL)
    (port,) = ports_of(tend, 1)
    assert fetch(port) == POEM.read_bytes()
    assert "PoetryFactory starting on" in tend.stdout
    assert "SlowPoetryFactory" not in tend.stdout
    assert tend.stop() == 0


def test_bad_slow_options_are_usage_errors(run_tend: Callable[..., Tend]) -> None:
    """A chunk size below 1 or a negative delay is rejected, naming the option (exit 2)."""
    for option, value, reason in [
        ("--chunk-size", "0", "invalid chunk size '0'"),
        ("--delay", "-1", "invalid duration '-1'"),
    ]:
        tend = run_tend(*FOREGROUND, "poetry", option, value)
        assert tend.wait() == 2
        assert f"argument {option}: {reason}" in tend.stderr


# -- backpressure: a client that never reads costs one piece, not a poem ----------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("extra", [[], ["--chunk-size", "65536"]], ids=["whole", "pieces"])
def test_clients_that_never_read_do_not_grow_the_server(
    run_tend: Callable[..., Tend], tmp_path: Path, extra: list[str], loop: str
) -> None:
    """Ten clients that never read a 16 MiB poem cost far less than ten copies of it."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    big = tmp_path / "big.txt"
    line = b"So, so, break off this last lamenting kiss,\n"
    big.write_bytes(line * (16 * MIB // len(line)))
    tend = run_tend(*FOREGROUND, "--loop", loop, "poetry", *LOCAL, "--poem", str(big), *extra)
    (port,) = ports_of(tend, 1)
    assert fetch(port) == big.read_bytes()  # the whole poem still arrives, in order
    worker = worker_of(tend)  # the supervisor holds no poem and serves no client
    before = rss_kib(worker)
    idle = []
    try:
        for _ in range(10):
            sock = socket.socket()
            idle.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
        wait_until(lambda: count_in(tend, r"sending \d+ bytes of poetry to") == 11)
        # One more whole fetch: the server has since been round its loop many times.
        assert fetch(port) == big.read_bytes()
        grown_mib = (rss_kib(worker) - before) / 1024
    finally:
        for sock in idle:
            sock.close()
    # Ten copies would be 160 MiB; a piece and a buffer each is about 1 MiB in all.
    assert grown_mib < 40, f"the server grew by {grown_mib:.0f} MiB"
    wait_until(lambda: count_in(tend, r"closed after \d+ of \d+ bytes of poetry") == 10)
    assert tend.stop() == 0


# -- the poem file: a regular file, of at most --max-poem-bytes ------------------------------


def test_a_fifo_as_the_poem_fails_the_start_at_once(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """A FIFO would make the start wait for ever: one line, exit 1, at once."""
    fifo = tmp_path / "poem.fifo"
    os.mkfifo(fifo)
    tend = run_tend(*FOREGROUND, "poetry", *LOCAL, "--poem", str(fifo))
    assert tend.wait(timeout=30) == 1
    assert tend.stderr == (
        f"tend: cannot read poem file {str(fifo)!r}: it is a FIFO, not a regular file\n"
    )


def test_a_fifo_as_the_poem_leaves_no_daemon_and_no_pidfile(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """Detached, the launcher reports the same line; no daemon, no pidfile stays behind."""
    fifo = tmp_path / "poem.fifo"
    os.mkfifo(fifo)
    tend = run_tend("poetry", *LOCAL, "--poem", str(fifo))
    assert tend.wait(timeout=30) == 1
    assert "it is a FIFO, not a regular file" in tend.stderr
    assert len(tend.stderr.splitlines()) == 1
    assert not (tmp_path / "tend.pid").exists()


@pytest.mark.parametrize(
    ("poem", "extra", "reason"),
    [
        ("/dev/zero", [], "it is a device, not a regular file"),
        (
            str(POEM),
            ["--max-poem-bytes", "100"],
            "it is larger than the limit of 100 bytes; raise it with --max-poem-bytes",
        ),
    ],
    ids=["dev-zero", "too-large"],
)
def test_a_poem_that_is_no_regular_file_or_too_large_fails_the_start(
    run_tend: Callable[..., Tend], poem: str, extra: list[str], reason: str
) -> None:
    """/dev/zero would be read until memory ran out; a poem over the limit is refused."""
    tend = run_tend(*FOREGROUND, "poetry", *LOCAL, "--poem", poem, *extra)
    assert tend.wait(timeout=30) == 1
    assert tend.stderr == f"tend: cannot read poem file {poem!r}: {reason}\n"


def test_an_empty_poem_fails_the_start(run_tend: Callable[..., Tend], tmp_path: Path) -> None:
    """Every client would get nothing, which get-poetry takes for a failed fetch: refused."""
    empty = tmp_path / "empty.txt"
    empty.touch()
    tend = run_tend(*FOREGROUND, "poetry", *LOCAL, "--poem", str(empty))
    assert tend.wait(timeout=30) == 1
    assert tend.stderr == f"tend: cannot serve poem file {str(empty)!r}: it is empty\n"


def test_max_poem_bytes_raises_the_limit_and_is_in_the_help(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """A poem over 16 MiB is served with --max-poem-bytes above its size; --help says so."""
    big = tmp_path / "big.txt"
    line = b"So, so, break off this last lamenting kiss,\n"
    big.write_bytes(line * (17 * MIB // len(line)))
    refused = run_tend(*FOREGROUND, "poetry", *LOCAL, "--poem", str(big))
    assert refused.wait(timeout=30) == 1
    assert "larger than the limit of 16,777,216 bytes" in refused.stderr
    tend = run_tend(
        *FOREGROUND, "poetry", *LOCAL, "--poem", str(big), "--max-poem-bytes", str(32 * MIB)
    )
    (port,) = ports_of(tend, 1)
    assert fetch(port) == big.read_bytes()
    assert tend.stop() == 0
    helped = run_tend("poetry", "--help")
    assert helped.wait() == 0
    assert re.search(r"--max-poem-bytes.*\n(.*\n)*.*\(default: 16777216\)", helped.stdout)
