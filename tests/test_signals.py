"""Tests for tend.signals: handlers that record and wake, forks, the loop, abandoning."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest

from tend.signals import Signals


@pytest.fixture
def signals() -> Iterator[Signals]:
    """SIGUSR2 recorded for the test; the previous handler back at the end."""
    previous = signal.getsignal(signal.SIGUSR2)
    recorder = Signals(catch=(signal.SIGUSR2,)).install()
    yield recorder
    recorder.close()
    signal.signal(signal.SIGUSR2, previous)


def readable(fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_a_signal_is_recorded_and_wakes_the_pipe(signals: Signals) -> None:
    """The handler records the signal; the wake-up pipe becomes readable; take empties both."""
    os.kill(os.getpid(), signal.SIGUSR2)
    assert readable(signals.wakeup_fd)
    assert signals.peek() == [signal.SIGUSR2]
    assert signals.take() == [signal.SIGUSR2]
    assert signals.take() == []
    assert not readable(signals.wakeup_fd, 0)


def test_a_signal_blocked_meanwhile_is_delivered_after(signals: Signals) -> None:
    """Within blocked() a signal waits; it is recorded once the block ends."""
    with signals.blocked():
        # To this thread: another one (an event loop's thread pool left by an earlier test)
        # would take a signal sent to the process, blocked here or not.
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
        assert signals.peek() == []
    assert signals.take() == [signal.SIGUSR2]


def test_a_forked_child_gets_signals_sent_to_it_in_the_fork_window(signals: Signals) -> None:
    """A signal sent to the child before it renewed its handlers reaches the child's own."""
    read_end, write_end = os.pipe()
    with signals.forking():
        pid = os.fork()
        if pid == 0:
            child = signals.renew()
            os.kill(os.getpid(), signal.SIGUSR2)  # still blocked: pending for the child
    if pid == 0:
        status = 1
        try:
            status = 0 if readable(child.wakeup_fd) and child.take() == [signal.SIGUSR2] else 1
            os.write(write_end, b"ok" if status == 0 else b"no")
        finally:
            os._exit(status)
    os.close(write_end)
    assert os.read(read_end, 2) == b"ok"
    os.close(read_end)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert signals.take() == []  # the parent heard nothing


def test_the_loop_gets_signals_recorded_before_and_gives_them_back(signals: Signals) -> None:
    """hand_to_loop passes on what came before; take_back_from_loop records again after."""
    os.kill(os.getpid(), signal.SIGUSR2)
    received: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        second = asyncio.Event()

        def on_signal(number: int) -> None:
            received.append(number)
            if len(received) == 2:
                second.set()

        signals.hand_to_loop(loop, on_signal)
        assert received == [signal.SIGUSR2]
        os.kill(os.getpid(), signal.SIGUSR2)
        async with asyncio.timeout(10):
            await second.wait()
        signals.take_back_from_loop(loop)

    asyncio.run(main())
    assert received == [signal.SIGUSR2, signal.SIGUSR2]
    os.kill(os.getpid(), signal.SIGUSR2)
    assert signals.take() == [signal.SIGUSR2]


def test_a_stop_signal_abandons_code_that_never_returns() -> None:
    """abandoning_on_stop: a block stuck in user code is left; abandon gets the reason."""
    code = textwrap.dedent(
        """
        import os, signal, sys, time
        from tend.signals import CAUGHT, Signals, abandoning_on_stop

        signals = Signals(catch=CAUGHT).install()

        def abandon(reason):
            sys.stdout.write(reason + "\\n")
            sys.stdout.flush()
            os._exit(7)

        with abandoning_on_stop(signals, abandon):
            print("stuck", flush=True)
            time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline() == "stuck\n"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 7
    assert process.stdout.read() == "stopped by SIGTERM before the services were ready\n"
    process.stdout.close()


def test_a_block_that_ends_first_keeps_the_signal_for_the_next_check() -> None:
    """If the block finishes, the watcher leaves; the signal stays recorded, nothing exits."""
    code = textwrap.dedent(
        """
        import os, signal
        from tend.signals import CAUGHT, Signals, abandoning_on_stop

        signals = Signals(catch=CAUGHT).install()
        with abandoning_on_stop(signals, lambda reason: os._exit(7)):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        print(signals.take() == [signal.SIGTERM], flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert (result.returncode, result.stdout) == (0, "True\n")
