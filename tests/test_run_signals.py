"""A stop signal at any point of a start: one line, a clean stop, nothing left behind."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Tend, wait_until

SLOW_APP = """
import asyncio, os, time
from pathlib import Path

import tend

MARKS = Path(os.environ["MARKS"])
PHASE = os.environ["SLOW_PHASE"]
if PHASE == "import":
    (MARKS / "import").touch()
    time.sleep(60)


class Slow(tend.Service):
    def privileged_start_service(self):
        if PHASE == "privileged":
            (MARKS / "privileged").touch()
            # Busy until the test has signalled, and a moment more for a launcher to pass
            # the signal on: it is recorded meanwhile, and the start stops when this returns.
            deadline = time.monotonic() + 60
            while not (MARKS / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)

    async def start_service(self):
        if PHASE == "start":
            (MARKS / "start").touch()
            await asyncio.sleep(60)
        await super().start_service()


application = tend.Application("slow")
tend.UNIXServer(str(MARKS / "slow.sock"), asyncio.Protocol).set_service_parent(application)
Slow("slow").set_service_parent(application)
"""


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment holds *marker* (the ones this test started)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != "Z":
            found.append(int(entry))
    return found


@pytest.mark.parametrize("phase", ["import", "privileged", "start"])
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("detached", [True, False], ids=["detached", "foreground"])
def test_a_stop_signal_during_the_start_stops_cleanly(
    run_tend: Callable[..., Tend],
    tmp_path: Path,
    phase: str,
    signal_number: int,
    detached: bool,
) -> None:
    """SIGTERM or SIGINT to the command while the app loads, binds or starts: the daemon
    stops cleanly, and only then does the command exit 1 with its one line."""
    app = tmp_path / "app.py"
    app.write_text(SLOW_APP)
    marker = f"TEND_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, "MARKS": str(tmp_path), "SLOW_PHASE": phase, marker: "1"}
    mode = [] if detached else ["--nodaemon"]
    tend = run_tend(*mode, "-y", str(app), env=env)
    wait_until(lambda: (tmp_path / phase).exists() or tend.exited)
    assert not tend.exited, tend.stderr
    os.kill(tend.pid, signal_number)
    (tmp_path / "go").touch()
    assert tend.wait(timeout=20) == 1
    name = signal.Signals(signal_number).name
    assert tend.stderr == f"tend: stopped by {name} before the services were ready\n"
    assert processes_with(marker) == []
    assert not (tmp_path / "tend.pid").exists()
    assert not (tmp_path / "slow.sock").exists()
    log = (tmp_path / "tend.log").read_text() if detached else tend.stdout
    assert "Traceback" not in log
    if phase != "import":
        assert log.rstrip().endswith("Server Shut Down."), log
