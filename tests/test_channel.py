"""Tests for tend.channel: the messages tend's processes send each other."""

from __future__ import annotations

import os

from tend.channel import Channel, Message, message


def test_a_message_is_sd_notify_lines() -> None:
    """Fields become KEY=VALUE lines; a value's newlines become spaces."""
    sent = message(READY=1, STATUS="serving\nPoetryFactory on 1.2.3.4:5", MAINPID=42)
    assert sent.encode() == b"READY=1\nSTATUS=serving PoetryFactory on 1.2.3.4:5\nMAINPID=42"
    received = Message.decode(sent.encode())
    assert received.ready
    assert received.mainpid == 42
    assert received.get("STATUS") == "serving PoetryFactory on 1.2.3.4:5"
    assert not received.stopping
    assert not received.watchdog
    assert received.error is None


def test_each_send_is_one_message_and_a_closed_peer_reads_as_the_end() -> None:
    """Two sends are two messages, never merged or split; then end-of-file."""
    ours, theirs = Channel.pair()
    try:
        assert theirs.send(WATCHDOG=1)
        assert theirs.send(ERROR="cannot listen on 127.0.0.1:1: permission denied")
        theirs.close()
        first, second = ours.receive(), ours.receive()
        assert first is not None
        assert first.watchdog
        assert second is not None
        assert second.error == "cannot listen on 127.0.0.1:1: permission denied"
        assert ours.receive() is None
    finally:
        ours.close()
        theirs.close()


def test_a_child_that_exits_closes_its_end() -> None:
    """A forked child's end closes with the child: the parent reads its word, then the end."""
    ours, theirs = Channel.pair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        theirs.send(READY=1)
        os._exit(0)
    theirs.close()
    try:
        got = ours.receive()
        assert got is not None
        assert got.ready
        assert ours.receive() is None
    finally:
        ours.close()
        os.waitpid(pid, 0)


def test_sending_to_a_gone_peer_is_false_not_an_error() -> None:
    ours, theirs = Channel.pair()
    ours.close()
    assert not theirs.send(READY=1)
    theirs.close()
    assert not theirs.send(READY=1)
