"""Tests for tend.supervision: the supervisor's decisions, on a clock the test turns."""

from __future__ import annotations

import signal

import pytest

from tend.channel import message
from tend.supervision import (
    KILL_GRACE,
    RESTART_FIRST,
    RESTART_MAX,
    RESTART_RESET,
    START_GRACE,
    STOP_OVERRUN,
    UNKNOWN_EXIT,
    Limits,
    Supervision,
    describe_exit,
)


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def running(count: int, clock: Clock, shutdown_timeout: float = 10.0) -> Supervision:
    """Workers 1..count started as pids 1001.., every one ready, ready reported."""
    core = Supervision(count, clock, Limits(shutdown_timeout=shutdown_timeout))
    for number in core.to_start():
        core.started(number, 1000 + number)
        core.said(1000 + number, message(READY=1))
    assert core.ready_to_report()
    return core


def test_every_worker_is_started_at_first_and_then_none() -> None:
    """At first each worker number is due; once started, none is."""
    clock = Clock()
    core = Supervision(3, clock, Limits())
    assert core.to_start() == [1, 2, 3]
    for number in (1, 2, 3):
        core.started(number, 1000 + number)
    assert core.to_start() == []
    assert core.next_wakeup() == clock.now + Limits().start_timeout + START_GRACE


def test_ready_is_reported_once_when_every_worker_is_ready() -> None:
    """READY from some workers is not enough; from all, it is reported exactly once."""
    clock = Clock()
    core = Supervision(2, clock, Limits())
    core.started(1, 1001)
    core.started(2, 1002)
    core.said(1001, message(READY=1))
    assert not core.ready_to_report()
    core.said(1002, message(READY=1))
    assert core.ready_to_report()
    assert not core.ready_to_report()


def test_an_error_before_ready_fails_the_start() -> None:
    """ERROR from a worker before all are ready is the start's failure; nothing restarts."""
    core = Supervision(2, Clock(), Limits())
    core.started(1, 1001)
    core.started(2, 1002)
    core.said(1002, message(ERROR="cannot read poem file 'x': No such file or directory"))
    assert core.failure == "cannot read poem file 'x': No such file or directory"
    assert not core.ready_to_report()
    assert core.exited(1002, 1) is None
    assert core.to_start() == []
    assert core.stop()
    assert core.exited(1001, 0) is None
    assert core.finished


def test_an_exit_before_ready_without_a_word_is_named() -> None:
    """A worker that dies before READY without an ERROR fails the start, saying how it died."""
    core = Supervision(1, Clock(), Limits())
    core.started(1, 1001)
    core.exited(1001, -signal.SIGKILL)
    assert core.failure == "worker 1 exited with signal SIGKILL before it was ready"


def test_a_worker_that_dies_young_is_restarted_after_a_doubling_pause() -> None:
    """0.5 s, 1 s, 2 s ... up to 30 s while it keeps dying young."""
    clock = Clock()
    core = running(1, clock)
    pid = 1001
    expected = RESTART_FIRST
    for _ in range(10):
        clock.advance(1)
        exit_ = core.exited(pid, 1)
        assert exit_ is not None
        assert exit_.restart_in == min(expected, RESTART_MAX)
        assert exit_.how == "status 1"
        assert core.next_wakeup() == clock.now + exit_.restart_in
        clock.advance(exit_.restart_in - 0.01)
        assert core.to_start() == []
        clock.advance(0.01)
        assert core.to_start() == [1]
        pid += 1
        core.started(1, pid)
        expected *= 2


def test_a_worker_that_lived_long_is_restarted_at_once_and_the_pause_resets() -> None:
    """After RESTART_RESET seconds of life a death counts as the first."""
    clock = Clock()
    core = running(1, clock)
    clock.advance(1)
    assert core.exited(1001, 1).restart_in == RESTART_FIRST  # type: ignore[union-attr]
    clock.advance(RESTART_FIRST)
    core.started(1, 1002)
    clock.advance(RESTART_RESET + 1)
    exit_ = core.exited(1002, -signal.SIGTERM)
    assert exit_ is not None
    assert exit_.restart_in == 0.0
    assert exit_.how == "signal SIGTERM"
    assert core.to_start() == [1]


def test_each_worker_number_keeps_its_own_pause() -> None:
    """Worker 2 dying young does not lengthen worker 1's pause."""
    clock = Clock()
    core = running(2, clock)
    clock.advance(1)
    assert core.exited(1002, 1).restart_in == RESTART_FIRST  # type: ignore[union-attr]
    clock.advance(RESTART_FIRST)
    core.started(2, 1003)
    clock.advance(1)
    assert core.exited(1003, 1).restart_in == 2 * RESTART_FIRST  # type: ignore[union-attr]
    assert core.exited(1001, 1).restart_in == RESTART_FIRST  # type: ignore[union-attr]


def test_a_stop_cancels_pending_restarts_and_kills_once_after_the_drain() -> None:
    """No restart after a stop; SIGKILL is due once, after the worker's own limit (the drain
    and its overrun, when it resets what is left) and a grace more."""
    clock = Clock()
    core = running(2, clock, shutdown_timeout=10.0)
    clock.advance(1)
    core.exited(1001, 1)
    assert core.stop()
    assert not core.stop()  # a second signal is not a new stop
    assert core.to_start() == []
    assert KILL_GRACE > 0
    assert core.next_wakeup() == clock.now + 10.0 + STOP_OVERRUN + KILL_GRACE
    clock.advance(10.0 + STOP_OVERRUN + KILL_GRACE - 0.01)
    assert not core.kill_due()
    clock.advance(0.01)
    assert core.kill_due()
    assert not core.kill_due()
    assert core.status == 1
    assert core.exited(1002, -signal.SIGKILL) is None
    assert core.finished


def test_a_clean_stop_has_status_zero_and_an_unclean_worker_makes_it_one() -> None:
    """The exit status tells how the workers' stop went."""
    clock = Clock()
    core = running(2, clock)
    core.stop()
    core.exited(1001, 0)
    assert core.status == 0
    assert not core.finished
    core.exited(1002, 1)
    assert core.status == 1
    assert core.finished


def test_a_worker_replaced_earlier_does_not_count_against_the_stop() -> None:
    """A worker that died and was replaced while serving leaves the stop's status alone."""
    clock = Clock()
    core = running(1, clock)
    core.exited(1001, -signal.SIGKILL)
    clock.advance(RESTART_FIRST)
    core.started(1, 1002)
    core.stop()
    core.exited(1002, 0)
    assert core.status == 0


def test_the_watchdog_is_due_only_when_every_worker_has_pinged() -> None:
    """One silent worker holds the pings back; once all have pinged, one ping is due."""
    core = running(2, Clock())
    assert not core.watchdog_due()
    core.said(1001, message(WATCHDOG=1))
    core.said(1001, message(WATCHDOG=1))
    assert not core.watchdog_due()
    core.said(1002, message(WATCHDOG=1))
    assert core.watchdog_due()
    assert not core.watchdog_due()


def test_a_worker_still_starting_does_not_hold_the_watchdog_back() -> None:
    """A replacement worker pings only once ready: until then the ready ones suffice."""
    core = running(2, Clock())
    core.exited(1002, 1)  # worker 2 died; its replacement starts
    core.started(2, 1003)
    core.said(1001, message(WATCHDOG=1))
    assert core.watchdog_due()
    core.said(1003, message(READY=1))
    core.said(1001, message(WATCHDOG=1))
    assert not core.watchdog_due()  # ready now: its ping is awaited too
    core.said(1003, message(WATCHDOG=1))
    assert core.watchdog_due()


def test_messages_from_unknown_pids_are_ignored() -> None:
    """A message or exit of a pid the core never started changes nothing."""
    core = running(1, Clock())
    core.said(4242, message(ERROR="not mine"))
    assert core.exited(4242, 1) is None
    assert core.failure is None


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (0, "status 0"),
        (3, "status 3"),
        (-9, "signal SIGKILL"),
        (UNKNOWN_EXIT, "an unknown status (reaped by other code)"),
    ],
)
def test_exits_are_described(code: int, text: str) -> None:
    assert describe_exit(code) == text


def test_a_worker_not_ready_in_time_is_killed_once_and_fails_the_start() -> None:
    """Past the start timeout and its grace, a worker not yet ready is due for a kill."""
    clock = Clock()
    core = Supervision(2, clock, Limits(start_timeout=5.0))
    core.started(1, 1001)
    core.started(2, 1002)
    core.said(1001, message(READY=1))
    clock.advance(5.0 + START_GRACE - 0.01)
    assert core.overdue() == []
    clock.advance(0.01)
    (late,) = core.overdue()
    assert late.pid == 1002
    assert core.overdue() == []
    assert core.failure == ("worker 2 did not start within 5 s, and its event loop did not answer")


def test_a_silent_worker_is_killed_and_then_replaced() -> None:
    """After READY, a worker that says nothing for the worker timeout is due for a kill."""
    clock = Clock()
    core = Supervision(1, clock, Limits(worker_timeout=8.0))
    core.started(1, 1001)
    core.said(1001, message(READY=1))
    assert core.ready_to_report()
    clock.advance(7.0)
    core.said(1001, message(WATCHDOG=1))  # a ping resets the clock
    clock.advance(7.99)
    assert core.overdue() == []
    assert core.next_wakeup() == clock.now + 0.01
    clock.advance(0.01)
    assert [late.pid for late in core.overdue()] == [1001]
    assert core.failure is None
    exit_ = core.exited(1001, -signal.SIGKILL)
    assert exit_ is not None
    assert exit_.how == "signal SIGKILL"


def test_no_limit_means_no_kill() -> None:
    """0 turns a limit off: a worker may take for ever to start, and stay silent."""
    clock = Clock()
    core = Supervision(1, clock, Limits(start_timeout=0, worker_timeout=0))
    core.started(1, 1001)
    clock.advance(10_000)
    assert core.overdue() == []
    core.said(1001, message(READY=1))
    clock.advance(10_000)
    assert core.overdue() == []
    assert core.next_wakeup() is None
    assert Limits(worker_timeout=0).ping_interval is None
    assert Limits(worker_timeout=30).ping_interval == 7.5


def test_a_fork_that_fails_before_ready_fails_the_start() -> None:
    """Worker 2 cannot be forked while the start is under way: the start fails, naming it."""
    clock = Clock()
    core = Supervision(2, clock, Limits())
    core.started(1, 1001)
    assert core.could_not_start(2, "Resource temporarily unavailable") is None
    assert core.failure == "cannot start worker 2: Resource temporarily unavailable"
    assert core.to_start() == []


def test_a_fork_that_fails_later_is_tried_again_after_a_growing_back_off() -> None:
    """Serving, a worker that cannot be forked is tried again: 0.5 s, then 1 s, ..."""
    clock = Clock()
    core = running(2, clock)
    died = core.exited(1001, -9)  # young: its replacement waits 0.5 s
    assert died is not None
    clock.advance(died.restart_in)
    assert core.to_start() == [1]
    assert core.could_not_start(1, "Resource temporarily unavailable") == 1.0
    assert core.to_start() == []
    clock.advance(1.0)
    assert core.to_start() == [1]
    assert core.could_not_start(1, "Resource temporarily unavailable") == 2.0
    assert core.failure is None
    core.stop()
    assert core.could_not_start(1, "Resource temporarily unavailable") is None
