"""Limits on a start that does not end and a worker that stops answering."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import POEM, fetch, wait_until, workers_ready

SLOW_APP = """
import asyncio, os, time
import tend

HOW = os.environ["HOW"]
if HOW == "import":
    while True:
        pass

class Slow(tend.Service):
    async def start_service(self):
        if HOW == "await":
            await asyncio.Event().wait()  # never set
        else:
            time.sleep(3600)  # the event loop itself is stuck
        await super().start_service()

application = tend.Application("slow")
tend.UNIXServer(os.environ["SOCKET"], asyncio.Protocol).set_service_parent(application)
Slow("slow").set_service_parent(application)
"""


@pytest.mark.parametrize(
    ("how", "line"),
    [
        ("import", "app file '{app}' did not finish loading within 1 s (--start-timeout)"),
        ("await", "<Slow 'slow'> did not finish starting within 1 s (--start-timeout)"),
        ("block", "worker 1 did not start within 1 s, and its event loop did not answer"),
    ],
)
@pytest.mark.parametrize("detached", [True, False], ids=["detached", "foreground"])
def test_a_start_that_never_ends_fails_after_the_start_timeout(
    run_tend, tmp_path: Path, how: str, line: str, detached: bool
) -> None:
    """An app file that loops at import, a start_service that never returns or one that
    blocks the loop: one line naming it, exit 1, nothing left, all within the limit."""
    app = tmp_path / "app.py"
    app.write_text(SLOW_APP)
    socket_file = tmp_path / "slow.sock"
    env = {**os.environ, "HOW": how, "SOCKET": str(socket_file)}
    mode = [] if detached else ["--nodaemon"]
    started = time.monotonic()
    tend = run_tend(*mode, "--start-timeout", "1", "-y", str(app), env=env)
    assert tend.wait(timeout=30) == 1
    assert time.monotonic() - started < 15
    assert tend.stderr == f"tend: {line.format(app=app)}\n"
    assert not (tmp_path / "tend.pid").exists()
    assert not socket_file.exists()


def test_a_stopped_worker_is_killed_and_replaced(run_tend, tmp_path: Path) -> None:
    """--worker-timeout: a SIGSTOPped worker answers nothing; it is killed, logged, replaced,
    and the port is served again."""
    tend = run_tend("--nodaemon", "--workers", "2", "--worker-timeout", "2",
                    "poetry", "--port", "0", "--iface", "127.0.0.1")  # fmt: skip
    port = tend.wait_for_port()
    children = Path(f"/proc/{tend.pid}/task/{tend.pid}/children")
    # Both ready (a worker stopped before it is ready is the start timeout's business).
    stopped = workers_ready(tend, 2)[0]
    os.kill(stopped, signal.SIGSTOP)
    tend.wait_for_output(
        rf"worker \d \(pid {stopped}\) has not answered for 2 s; killing it", timeout=30
    )
    tend.wait_for_output(rf"worker \d \(pid {stopped}\) exited with signal SIGKILL", timeout=30)
    wait_until(lambda: len(children.read_text().split()) == 2 and str(stopped) not in
               children.read_text().split())  # fmt: skip
    for _ in range(10):
        assert fetch(port, timeout=5) == POEM.read_bytes()
    assert tend.stop() == 0
