"""Graceful drain: on SIGTERM the listener closes, clients in flight finish or are reset."""

from __future__ import annotations

import signal
import socket
import time

import pytest
from conftest import POEM

SLOW = ["poetry", "--port", "0", "--iface", "127.0.0.1", "--chunk-size", "200", "--delay", "0.05"]


def read_all(client: socket.socket) -> bytes:
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    return data


def test_slow_client_mid_poem_gets_the_rest_within_the_deadline(run_tend):
    """A slow-poetry client mid-poem at SIGTERM still receives the whole poem; exit 0."""
    tend = run_tend("--nodaemon", "--pidfile", "", "--shutdown-timeout", "20", *SLOW)
    port = tend.wait_for_port()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        first = client.recv(65536)
        assert 0 < len(first) < POEM.stat().st_size
        tend.process.send_signal(signal.SIGTERM)
        tend.wait_for_output(r"\(TCP Port \d+ Closed\)")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert first + read_all(client) == POEM.read_bytes()
    assert tend.wait() == 0
    assert "aborted" not in tend.stdout


def test_client_that_cannot_finish_in_time_is_reset_and_counted(run_tend):
    """Past --shutdown-timeout the rest is reset (never a clean end); exit status 1."""
    tend = run_tend("--nodaemon", "--pidfile", "", "--shutdown-timeout", "0.3", *SLOW)
    port = tend.wait_for_port()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.recv(65536)
        started = time.monotonic()
        tend.process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionResetError):
            read_all(client)
        assert time.monotonic() - started < 15
    assert tend.wait() == 1
    tend.wait_for_output(r"aborted 1 connection\(s\) on TCP Port \d+ still open after 0\.\d s")


HANGING_STOP_APP = """
import asyncio, tend
from tend.poetry.server import PoetryService
from tend.poetry.slow import SlowPoetryFactory

class Stuck(tend.Service):
    async def stop_service(self):
        await asyncio.sleep(3600)  # never finishes stopping

application = tend.Application("stuck")
poetry = PoetryService({poem!r})
poetry.set_service_parent(application)
tend.TCPServer(0, SlowPoetryFactory(poetry, 100, 0.2), interface="127.0.0.1").set_service_parent(
    application
)
# Added last, so stopped first: the listener's drain never begins.
Stuck("stuck").set_service_parent(application)
"""


def test_a_service_that_never_stops_still_ends_in_a_reset_not_a_clean_end(run_tend, tmp_path):
    """A stop_service that hangs: the worker gives up on it and resets the cut poem itself
    before the supervisor would kill it, so the client never sees a clean end-of-file."""
    app = tmp_path / "app.py"
    app.write_text(HANGING_STOP_APP.format(poem=str(POEM)))
    tend = run_tend("--nodaemon", "--pidfile", "", "--shutdown-timeout", "0.5", "-y", str(app))
    port = tend.wait_for_port()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.recv(65536)
        tend.process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionResetError):
            read_all(client)
    assert tend.wait(timeout=30) == 1
    assert "services did not stop within 5.5 s; stopping at once." in tend.stdout
    assert "killing them" not in tend.stdout
