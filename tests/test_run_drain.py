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
