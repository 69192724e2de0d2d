"""Tests for tend.logs: formats, files and rotation, syslog, journald, batching, access log."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tend
from tend.errors import StartupError, quote
from tend.logs import (
    LogConfig,
    LogError,
    LogSink,
    open_log,
    parse_syslog_address,
)
from tend.logs.access import AccessLog
from tend.logs.rotating import RECORD_END

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d{4}"
OpenSink = Callable[..., LogSink]
Attach = Callable[..., logging.Logger]


@pytest.fixture(autouse=True)
def _outside_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as if not under systemd, even when they are; journald tests set it."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)


@pytest.fixture
def open_sink() -> Iterator[OpenSink]:
    """`open_log`, with every sink closed and the root logger's level restored at the end."""
    root = logging.getLogger()
    level = root.level
    opened: list[LogSink] = []

    def open_(config: LogConfig, stdout: io.StringIO | None = None) -> LogSink:
        sink = open_log(config, stdout)
        opened.append(sink)
        return sink

    yield open_
    for sink in opened:
        sink.close()
    root.setLevel(level)


@pytest.fixture
def attach() -> Iterator[Attach]:
    """Send one logger's records to a sink only, so volume tests skip pytest's log capture."""
    attached: list[tuple[logging.Logger, logging.Handler]] = []

    def attach_(sink: LogSink, name: str = "tend") -> logging.Logger:
        logger = logging.getLogger(name)
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addHandler(sink.handler)
        attached.append((logger, sink.handler))
        return logger

    yield attach_
    for logger, handler in attached:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for unix sockets (their paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tend-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def run_child(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run *code* in a fresh interpreter, its standard output and error two separate pipes."""
    environment = {key: value for key, value in os.environ.items() if key != "JOURNAL_STREAM"}
    environment.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def read_log(path: Path) -> list[str]:
    return path.read_text().splitlines()


# Text format


def test_install_logs_log_opened_in_twistd_format(open_sink: OpenSink) -> None:
    """install() attaches to the root logger and logs twistd's first line."""
    out = io.StringIO()
    sink = open_sink(LogConfig(), out)
    sink.install()
    assert sink.handler in logging.getLogger().handlers
    assert re.fullmatch(rf"{STAMP} \[-\] Log opened\.\n", out.getvalue())


@pytest.mark.parametrize(
    ("name", "context"),
    [
        ("", "-"),
        ("tend", "-"),
        ("tend.net", "tend.net"),
        ("tend.poetry", "tend.poetry"),
        ("tend.poetry.server", "tend.poetry.server"),
        ("asyncio", "asyncio"),
        ("tendency", "tendency"),
    ],
)
def test_context_is_dash_for_tend_else_logger_name(
    open_sink: OpenSink, name: str, context: str
) -> None:
    """tend's own logger and the root show '-'; every other logger shows its name."""
    out = io.StringIO()
    sink = open_sink(LogConfig(), out)
    sink.install()
    logging.getLogger(name).warning("hello")
    assert out.getvalue().splitlines()[-1].endswith(f" [{context}] hello")


def test_context_from_extra_overrides_logger_name(open_sink: OpenSink) -> None:
    """extra={'context': ...} sets the bracketed part, as twistd's per-connection system."""
    out = io.StringIO()
    sink = open_sink(LogConfig(), out)
    sink.install()
    logging.getLogger("tend.poetry.server").info(
        "sending %d bytes of poetry to %s",
        3003,
        "127.0.0.1:58208",
        extra={"context": "PoetryProtocol,0,127.0.0.1"},
    )
    assert re.fullmatch(
        rf"{STAMP} \[PoetryProtocol,0,127\.0\.0\.1\] sending 3003 bytes of poetry to "
        r"127\.0\.0\.1:58208",
        out.getvalue().splitlines()[-1],
    )


def test_timestamp_is_local_time_with_numeric_offset() -> None:
    """The stamp is local time with a +HHMM offset, recomputed when the second changes."""
    result = run_child(
        """
        import io, logging
        from tend.logs import LogConfig, open_log
        out = io.StringIO()
        sink = open_log(LogConfig(), out)
        for created in (0.0, 0.9, 1.0, 3600.5):
            record = logging.LogRecord("tend", logging.INFO, "-", 0, "m", None, None)
            record.created = created
            sink.handler.handle(record)
        print(out.getvalue(), end="")
        """,
        {"TZ": "XST-05:30"},  # POSIX TZ: five and a half hours east of UTC, no tzdata needed
    )
    assert result.stdout.splitlines() == [
        "1970-01-01 05:30:00+0530 [-] m",
        "1970-01-01 05:30:00+0530 [-] m",
        "1970-01-01 05:30:01+0530 [-] m",
        "1970-01-01 06:30:00+0530 [-] m",
    ]


def test_traceback_lines_are_prefixed_like_the_message(open_sink: OpenSink) -> None:
    """Every line of a traceback carries the stamp and context, so grep by time finds it."""
    out = io.StringIO()
    sink = open_sink(LogConfig(), out)
    sink.install()
    try:
        1 / 0  # noqa: B018 -- the exception is the point
    except ZeroDivisionError:
        logging.getLogger("tend.poetry.server").exception("cannot send a poem")
    lines = out.getvalue().splitlines()[1:]  # after "Log opened."
    prefix = re.compile(rf"{STAMP} \[tend\.poetry\.server\] ")
    assert all(prefix.match(line) for line in lines), lines
    bodies = [prefix.sub("", line) for line in lines]
    assert bodies[0] == "cannot send a poem"
    assert bodies[1] == "Traceback (most recent call last):"
    assert bodies[-1] == "ZeroDivisionError: division by zero"
    assert len({line[:24] for line in lines}) <= 2  # one record, one stamp (two at a boundary)


def test_multiline_message_lines_are_prefixed(open_sink: OpenSink) -> None:
    """A message with newlines becomes several prefixed lines, never an unprefixed one."""
    out = io.StringIO()
    sink = open_sink(LogConfig(), out)
    sink.install()
    logging.getLogger("tend").info("first\nsecond\r\nthird\n")
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()[1:]] == [
        "first",
        "second",
        "third",
    ]


def test_level_filters_records(open_sink: OpenSink) -> None:
    """install() sets the root level from the config."""
    out = io.StringIO()
    sink = open_sink(LogConfig(level=logging.WARNING), out)
    sink.install()
    logging.getLogger("tend").info("hidden")
    logging.getLogger("tend").warning("shown")
    assert out.getvalue().endswith("[-] shown\n")
    assert "hidden" not in out.getvalue()
    assert "Log opened." not in out.getvalue()


def test_standard_output_is_the_default_stream(
    open_sink: OpenSink, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a stream, the sink writes to sys.stdout as it is when open_log is called."""
    sink = open_sink(LogConfig(logfile="-"))
    sink.install()
    assert sink.description == "standard output"
    assert sink.fileno() is None
    assert capsys.readouterr().out.endswith("[-] Log opened.\n")


# JSON format


def test_json_lines_carry_extra_fields_and_exception(open_sink: OpenSink) -> None:
    """Each record is one JSON object; extras at the top level; the traceback as exception."""
    out = io.StringIO()
    sink = open_sink(LogConfig(format="json"), out)
    sink.install()
    log = logging.getLogger("tend.poetry.server")
    unserialisable = object()
    log.info(
        "sending %d bytes",
        3003,
        extra={"peer": "127.0.0.1:58208", "size": 3003, "thing": unserialisable, "level": "x"},
    )
    try:
        raise ValueError("bad poem")
    except ValueError:
        log.error("cannot send\nthe poem", exc_info=True)
    log.warning("not a number", extra={"ratio": float("nan")})
    opened, sent, failed, odd = (json.loads(line) for line in out.getvalue().splitlines())

    assert opened == {
        "time": opened["time"],
        "level": "info",
        "logger": "tend",
        "message": "Log opened.",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", opened["time"])
    assert sent == {
        "time": sent["time"],
        "level": "info",  # an extra cannot replace a standard field
        "logger": "tend.poetry.server",
        "message": "sending 3003 bytes",
        "peer": "127.0.0.1:58208",
        "size": 3003,
        "thing": str(unserialisable),
    }
    assert failed["level"] == "error"
    assert failed["message"] == "cannot send\nthe poem"
    assert failed["exception"].startswith("Traceback (most recent call last):\n")
    assert failed["exception"].endswith("ValueError: bad poem")
    assert odd["ratio"] == "nan"  # NaN is not JSON


def test_json_time_is_rfc3339_local_time_to_the_millisecond() -> None:
    """JSON time has the offset with a colon and milliseconds."""
    result = run_child(
        """
        import io, logging
        from tend.logs import LogConfig, open_log
        out = io.StringIO()
        sink = open_log(LogConfig(format="json"), out)
        for created in (0.25, 86400.5):
            record = logging.LogRecord("tend", logging.INFO, "-", 0, "m", None, None)
            record.created = created
            sink.handler.handle(record)
        print(out.getvalue(), end="")
        """,
        {"TZ": "XST+03:00"},  # three hours west of UTC
    )
    times = [json.loads(line)["time"] for line in result.stdout.splitlines()]
    assert times == ["1969-12-31T21:00:00.250-03:00", "1970-01-01T21:00:00.500-03:00"]


def test_invalid_format_is_a_log_error(open_sink: OpenSink) -> None:
    """An unknown format is refused with the choices."""
    with pytest.raises(LogError, match=r"cannot use log format 'xml': choose 'text' or 'json'"):
        open_sink(LogConfig(format="xml"))


# journald

JOURNALD_CHILD = """
    import logging, os
    status = os.fstat({fd})
    os.environ["JOURNAL_STREAM"] = {value}
    from tend.logs import LogConfig, open_log
    sink = open_log(LogConfig(level=logging.DEBUG, format="{format}"))
    sink.install()
    log = logging.getLogger("tend.poetry.server")
    log.debug("d")
    log.warning("w")
    log.critical("c")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("e")
    sink.close()
"""


def journald_child(
    fd: int, value: str = 'f"{status.st_dev}:{status.st_ino}"', format_: str = "text"
) -> list[str]:
    code = JOURNALD_CHILD.format(fd=fd, value=value, format=format_)
    return run_child(code).stdout.splitlines()


@pytest.mark.parametrize("fd", [2, 1], ids=["stderr", "stdout"])
def test_journald_lines_carry_priority_instead_of_time(fd: int) -> None:
    """When JOURNAL_STREAM names our stderr (or stdout), lines start with <priority>."""
    lines = journald_child(fd)
    assert lines[:4] == [
        "<6>[-] Log opened.",
        "<7>[tend.poetry.server] d",
        "<4>[tend.poetry.server] w",
        "<2>[tend.poetry.server] c",
    ]
    assert lines[4:6] == [
        "<3>[tend.poetry.server] e",
        "<3>[tend.poetry.server] Traceback (most recent call last):",
    ]
    assert lines[-1] == "<3>[tend.poetry.server] ZeroDivisionError: division by zero"
    assert all(line.startswith("<3>[tend.poetry.server] ") for line in lines[4:])


def test_journald_ignored_when_stream_does_not_match() -> None:
    """An inherited JOURNAL_STREAM naming another stream keeps twistd's timestamps."""
    lines = journald_child(2, value='"1:1"')
    assert re.fullmatch(rf"{STAMP} \[-\] Log opened\.", lines[0])


def test_journald_json_is_not_prefixed() -> None:
    """JSON lines stay plain JSON under journald."""
    lines = journald_child(2, format_="json")
    assert [json.loads(line)["level"] for line in lines] == [
        "info",
        "debug",
        "warning",
        "critical",
        "error",
    ]


# Files


def test_file_is_created_with_the_umask_and_appended_to(
    open_sink: OpenSink, tmp_path: Path
) -> None:
    """The file mode is what the umask allows; existing content is kept."""
    path = tmp_path / "tend.log"
    path.write_text("earlier line\n")
    os.chmod(path, 0o600)
    fresh = tmp_path / "fresh.log"
    previous = os.umask(0o027)
    try:
        open_sink(LogConfig(logfile=str(fresh))).install()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640

    sink = open_sink(LogConfig(logfile=str(path)))
    sink.install()
    assert sink.description == str(path)
    assert sink.fileno() is not None
    lines = read_log(path)
    assert lines[0] == "earlier line"
    assert re.fullmatch(rf"{STAMP} \[-\] Log opened\.", lines[1])


def test_missing_directory_is_a_log_error_naming_the_path(tmp_path: Path) -> None:
    """A log file that cannot be opened is a start failure with a one-line reason."""
    path = tmp_path / "nope" / "x.log"
    with pytest.raises(LogError) as raised:
        open_log(LogConfig(logfile=str(path)))
    assert str(raised.value) == f"cannot open log file '{path}': No such file or directory"
    assert isinstance(raised.value, StartupError)


def test_directory_as_log_file_is_a_log_error(tmp_path: Path) -> None:
    """A directory given as the log file is refused with the system's reason."""
    with pytest.raises(LogError, match=r"cannot use log file '.*': it is a directory"):
        open_log(LogConfig(logfile=str(tmp_path)))


def log_files(path: Path) -> list[Path]:
    """The rotated files oldest first, then the current one."""
    backups = sorted(
        (p for p in path.parent.iterdir() if re.fullmatch(re.escape(path.name) + r"\.\d+", p.name)),
        key=lambda p: int(p.suffix[1:]),
        reverse=True,
    )
    return [*backups, path]


async def test_rotation_under_volume_loses_and_splits_no_line(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """20,000 lines through rotation: every line whole, in order, no file past max_bytes."""
    path = tmp_path / "tend.log"
    max_bytes = 16_384
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=max_bytes))
    log = attach(sink)
    count = 20_000
    for number in range(count):
        log.info("line %05d %s.", number, "x" * (number % 97))
        # Batches of varied size, and one burst past the 64 KiB flush threshold.
        if number % 37 == 0 and not 5_000 <= number < 7_000:
            await asyncio.sleep(0)
    sink.close()

    files = log_files(path)
    assert len(files) > 50
    numbers = []
    pattern = re.compile(rf"{STAMP} \[-\] line (\d{{5}}) (x*)\.")
    for file in files:
        data = file.read_bytes()
        assert 0 < len(data) <= max_bytes, file
        assert data.endswith(b"\n")
        for line in data.decode().splitlines():
            match = pattern.fullmatch(line)
            assert match, line
            number = int(match.group(1))
            assert len(match.group(2)) == number % 97
            numbers.append(number)
    assert numbers == list(range(count))
    # Rotation happened only when needed: each file plus the next one's first line overflows.
    for older, newer in itertools.pairwise(files):
        first_line = newer.read_bytes().split(b"\n", 1)[0] + b"\n"
        assert older.stat().st_size + len(first_line) > max_bytes


def test_line_longer_than_max_bytes_fills_a_fresh_file(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """A line over the limit is written whole, alone in its own file."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=100))
    log = attach(sink)
    log.info("short one")
    log.info("long %s", "y" * 300)
    log.info("short two")
    sink.close()
    files = log_files(path)
    assert [file.name for file in files] == ["tend.log.2", "tend.log.1", "tend.log"]
    contents = [[line.split("] ", 1)[1] for line in read_log(file)] for file in files]
    assert contents == [["short one"], ["long " + "y" * 300], ["short two"]]


def test_first_line_longer_than_max_bytes_does_not_rotate_an_empty_file(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """An empty file takes an oversized line as it is: no empty tend.log.1 appears."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=100))
    attach(sink).info("long %s", "y" * 300)
    sink.close()
    assert log_files(path) == [path]
    assert read_log(path)[0].endswith("y" * 300)


def formatted_length(message: str) -> int:
    """The bytes one text line of *message* from logger tend takes in a file."""
    out = io.StringIO()
    sink = open_log(LogConfig(), out)
    record = logging.LogRecord("tend", logging.INFO, "-", 0, message, None, None)
    sink.handler.handle(record)
    sink.close()
    return len(out.getvalue().encode())


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "batched"])
async def test_file_may_reach_max_bytes_exactly(
    open_sink: OpenSink, attach: Attach, tmp_path: Path, batched: bool
) -> None:
    """Rotation waits for a line that would exceed the limit, not one that reaches it."""
    path = tmp_path / "tend.log"
    length = formatted_length("same length a")
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=2 * length))
    log = attach(sink)
    for letter in "abc":
        log.info("same length %s", letter)
        if not batched:
            sink.flush()
    sink.close()
    assert [file.stat().st_size for file in log_files(path)] == [2 * length, length]


def test_oversized_traceback_is_split_at_line_boundaries(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """A record larger than max_bytes spreads over files, each line whole and prefixed."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=200))
    log = attach(sink)

    def recurse(depth: int) -> None:
        if depth == 0:
            raise RuntimeError("deep")
        recurse(depth - 1)

    try:
        recurse(10)
    except RuntimeError:
        log.exception("failed")
    sink.close()
    files = log_files(path)
    assert len(files) > 3
    lines = [line for file in files for line in read_log(file)]
    assert all(re.match(rf"{STAMP} \[-\] ", line) for line in lines)
    assert lines[-1].endswith("RuntimeError: deep")
    assert all(file.stat().st_size <= 200 for file in files)


def test_existing_file_counts_toward_max_bytes(open_sink: OpenSink, tmp_path: Path) -> None:
    """A file already near the limit rotates before the first line that would overflow it."""
    path = tmp_path / "tend.log"
    path.write_text("o" * 90 + "\n")
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=100))
    sink.install()
    assert path.with_name("tend.log.1").read_text() == "o" * 90 + "\n"
    assert read_log(path)[0].endswith("Log opened.")


@pytest.mark.parametrize("backups", [0, 1, 3])
def test_backups_limit_keeps_the_newest_rotated_files(
    open_sink: OpenSink, attach: Attach, tmp_path: Path, backups: int
) -> None:
    """With backups=N only tend.log and .1 to .N remain, .1 the newest."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=200, backups=backups))
    log = attach(sink)
    for number in range(100):
        log.info("line %03d", number)
    sink.close()
    files = log_files(path)
    assert [file.name for file in files] == [
        *(f"tend.log.{n}" for n in range(backups, 0, -1)),
        "tend.log",
    ]
    numbers = [int(line[-3:]) for file in files for line in read_log(file)]
    assert numbers == list(range(100 - len(numbers), 100))


def test_a_file_left_to_a_successor_is_appended_to_but_never_rotated_or_reopened(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """After an upgrade the new supervisor owns the file: the old one, draining, appends to
    the file it has open and neither rotates nor reopens it (that would rename the new
    one's files under it)."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=200, backups=3))
    log = attach(sink)
    sink.leave_the_file()
    path.rename(tmp_path / "moved.log")  # what a rotation by the successor looks like
    sink.reopen()
    for number in range(50):
        log.info("line %03d", number)
    sink.close()
    assert not path.exists()
    assert log_files(tmp_path / "moved.log") == [tmp_path / "moved.log"]
    numbers = [int(line[-3:]) for line in read_log(tmp_path / "moved.log") if " line " in line]
    assert numbers == list(range(50))


def test_failed_rotation_keeps_every_line_in_the_current_file(
    open_sink: OpenSink, attach: Attach, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """When a backup cannot be removed, the error is said once, in one line; no line is lost."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=60, backups=1))
    (tmp_path / "tend.log.2").mkdir()  # a folder where a backup goes: not renamed, not removed
    log = attach(sink)
    for number in range(5):
        log.info("line %d", number)
    sink.close()
    assert [int(line[-1]) for line in read_log(path)] == [0, 1, 2, 3, 4]
    assert capfd.readouterr().err == (
        f"tend: cannot rotate log file {quote(str(path))}: 'tend.log.2' is a directory, "
        "not a rotated log; move it away\n"
    )
    assert (tmp_path / "tend.log.2").is_dir()


def test_rotated_names_skip_compressed_and_unrelated_files(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """logrotate's tend.log.1.gz and other files are left alone."""
    path = tmp_path / "tend.log"
    for name in ("tend.log.1.gz", "tend.log.01", "tend.log.x", "other.log.1"):
        (tmp_path / name).write_text(name)
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=60, backups=1))
    log = attach(sink)
    for number in range(10):
        log.info("line %d", number)
    sink.close()
    for name in ("tend.log.1.gz", "tend.log.01", "tend.log.x", "other.log.1"):
        assert (tmp_path / name).read_text() == name


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink", "directory"])
def test_a_log_path_that_is_not_a_regular_file_is_refused(
    open_sink: OpenSink, tmp_path: Path, kind: str
) -> None:
    """A FIFO, a device, a symbolic link or a folder as the log: one line, nothing touched."""
    path = tmp_path / "tend.log"
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("needs root to make a device node")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "symlink":
        path.symlink_to(victim)
    else:
        path.mkdir()
    with pytest.raises(LogError) as caught:
        open_sink(LogConfig(logfile=str(path)))
    message = str(caught.value)
    assert message.startswith(f"cannot use log file {quote(str(path))}: it is ")
    assert "\n" not in message
    assert victim.read_text() == "untouched\n"


def test_reopen_refuses_a_symlink_swapped_in_and_keeps_the_old_file(
    open_sink: OpenSink, attach: Attach, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A worker that replaced tend.log with a symlink to a root file gains nothing at SIGUSR1."""
    path = tmp_path / "tend.log"
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    sink = open_sink(LogConfig(logfile=str(path)))
    log = attach(sink)
    log.info("before")
    sink.flush()
    path.rename(tmp_path / "moved.log")
    path.symlink_to(victim)
    with pytest.raises(LogError, match="it is a symbolic link"):
        sink.reopen()
    log.info("after")
    sink.close()
    assert victim.read_text() == "root:secret\n"
    assert [line.split("] ", 1)[1] for line in read_log(tmp_path / "moved.log")] == [
        "before",
        "after",
    ]


def test_reopen_in_a_shared_folder_refuses_a_file_another_user_put_there(
    open_sink: OpenSink, tmp_path: Path
) -> None:
    """In a folder others can write, a file another user made (or a hard link) is refused."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file owned by another user")
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    path = folder / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path)))
    path.rename(folder / "moved.log")
    path.write_text("")
    os.chown(path, 65534, 65534)
    with pytest.raises(LogError, match="owned by uid 65534"):
        sink.reopen()
    path.unlink()
    os.link(folder / "moved.log", path)  # root's file, but under a second name
    with pytest.raises(LogError, match="has other names"):
        sink.reopen()


FULL_DISK_CHILD = """
import logging, os
from tend.logs import LogConfig, open_log

mount = {mount!r}
sink = open_log(LogConfig(logfile=os.path.join(mount, "tend.log"), max_bytes=0))
sink.install()
log = logging.getLogger("tend")
filler = os.open(os.path.join(mount, "filler"), os.O_WRONLY | os.O_CREAT)
try:
    while os.write(filler, b"x" * 4096):
        pass
except OSError:
    pass  # the file system is full; the log file's last page may still have room
os.close(filler)
for number in range(200):
    log.info("line %05d %s", number, "x" * 40)
    sink.flush()
os.remove(os.path.join(mount, "filler"))
for number in range(200, 300):
    log.info("line %05d %s", number, "x" * 40)
    sink.flush()
sink.close()
"""


def test_a_full_disk_never_tears_a_line_and_the_loss_is_counted(tmp_path: Path) -> None:
    """On a full file system a line is written whole or not at all; the lost ones are
    counted in the log once writing works again, and stderr gets two lines, no traceback."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        result = run_child(FULL_DISK_CHILD.format(mount=str(mount)))
        lines = read_log(mount / "tend.log")
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    numbers = []
    lost = None
    for line in lines:
        body = line.split("] ", 1)[1]
        if match := re.fullmatch(r"line (\d{5}) x{40}", body):
            numbers.append(int(match.group(1)))
        elif match := re.fullmatch(
            r"(\d+) log line\(s\) were lost while the log could not be written "
            r"\(No space left on device\)",
            body,
        ):
            lost = int(match.group(1))
        else:
            assert body == "Log opened.", line  # whole lines only: nothing glued or cut
    assert numbers == sorted(numbers)
    assert lost is not None
    assert lost > 0
    assert len(numbers) + lost == 300
    assert numbers[-100:] == list(range(200, 300))
    complaints = result.stderr.splitlines()
    assert len(complaints) == 2, result.stderr
    assert "No space left on device; counting the lines lost" in complaints[0]
    assert complaints[1].endswith(f"again; {lost} line(s) were lost")


async def test_reopen_after_move_writes_to_a_new_file(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """SIGUSR1's reopen: buffered lines go to the moved file, later ones to a new file."""
    path = tmp_path / "tend.log"
    moved = tmp_path / "tend.log.old"
    sink = open_sink(LogConfig(logfile=str(path)))
    log = attach(sink)
    log.info("before the move")  # still buffered: the loop has not turned
    old_fd = sink.fileno()
    path.rename(moved)
    sink.reopen()
    log.info("after the move")
    sink.close()
    assert [line.split("] ")[1] for line in read_log(moved)] == ["before the move"]
    assert [line.split("] ")[1] for line in read_log(path)] == ["after the move"]
    assert old_fd is not None


def test_reopen_failure_keeps_logging_to_the_old_file(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """If the path cannot be reopened, reopen raises LogError and lines keep flowing."""
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path)))
    log = attach(sink)
    log.info("one")
    path.rename(directory / "moved.log")
    path.mkdir()  # something that cannot be opened for writing now stands at the path
    with pytest.raises(LogError, match=r"cannot use log file .*: it is a directory"):
        sink.reopen()
    log.info("two")
    sink.close()
    assert [line.split("] ")[1] for line in read_log(directory / "moved.log")] == [
        "one",
        "two",
    ]


def test_rotation_and_reopen_follow_the_folder_not_the_path(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """The folder is held open: after it moves (as a chroot makes the path vanish), the log
    still rotates and reopens there."""
    directory = tmp_path / "logs"
    directory.mkdir()
    sink = open_sink(LogConfig(logfile=str(directory / "tend.log"), max_bytes=200))
    log = attach(sink)
    directory.rename(tmp_path / "moved")
    for number in range(20):
        log.info("line %d of a rotated log", number)
    sink.reopen()
    sink.close()
    moved = tmp_path / "moved"
    assert len(list(moved.glob("tend.log.*"))) >= 3
    lines = [line for path in moved.glob("tend.log*") for line in read_log(path)]
    assert len(lines) == 20
    assert not directory.exists()


def test_reopen_is_a_noop_for_standard_output(open_sink: OpenSink) -> None:
    """reopen() on standard output changes nothing and the sink keeps working."""
    out = io.StringIO()
    sink = open_sink(LogConfig(), out)
    sink.reopen()
    sink.install()
    assert out.getvalue().endswith("Log opened.\n")


def test_worker_lines_relayed_to_the_supervisor_are_written_and_rotated(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """relay_to() in a forked worker, write_lines() in its parent: one writer, no line lost."""
    path = tmp_path / "tend.log"
    max_bytes = 8_192
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=max_bytes))
    log = attach(sink)
    log.info("supervisor before the fork")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover -- runs in the worker
        status = 1
        try:
            os.close(read_end)
            sink.relay_to(write_end)
            for number in range(2_000):  # more than a pipe holds: the worker waits for reads
                log.info("worker %04d", number)
            sink.close()
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    pending = b""
    with open(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65_536):
            complete, _, pending = (pending + chunk).rpartition(RECORD_END)
            if complete:
                sink.write_lines(complete.decode().split(RECORD_END.decode()))
    assert pending == b""
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    log.info("supervisor after the worker")
    sink.close()

    files = log_files(path)
    assert len(files) > 5
    assert all(file.stat().st_size <= max_bytes for file in files)
    assert [line.split("] ", 1)[1] for file in files for line in read_log(file)] == [
        "supervisor before the fork",
        *(f"worker {number:04d}" for number in range(2_000)),
        "supervisor after the worker",
    ]


def test_only_a_log_file_relays(open_sink: OpenSink) -> None:
    """Standard output is shared by workers as it is; relay_to() refuses it."""
    sink = open_sink(LogConfig(), io.StringIO())
    with pytest.raises(RuntimeError, match="cannot relay"):
        sink.relay_to(1)


# Batching


async def test_lines_reach_the_file_within_one_loop_iteration(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """Lines are buffered while the loop runs a callback and written on its next turn."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path)))
    log = attach(sink)
    log.info("one")
    log.info("two")
    assert path.read_text() == ""  # batched, not yet written
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [line.split("] ")[1] for line in read_log(path)] == ["one", "two"]


async def test_lines_in_a_busy_spell_are_written_within_the_flush_interval(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """Right after a write, new lines wait at most the flush interval, then go out together."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path)))
    log = attach(sink)
    log.info("first")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(read_log(path)) == 1  # after a quiet spell: at once
    log.info("second")
    log.info("third")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(read_log(path)) == 1  # busy: batched until the interval has passed
    for _ in range(500):  # poll for up to 5 s
        if len(read_log(path)) == 3:
            break
        await asyncio.sleep(0.01)
    assert [line.split("] ")[1] for line in read_log(path)] == ["first", "second", "third"]


async def test_errors_are_written_at_once(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """An ERROR record writes the batch immediately: the process may be about to die."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path)))
    log = attach(sink)
    log.info("context")
    log.error("failure")
    assert [line.split("] ")[1] for line in read_log(path)] == ["context", "failure"]


async def test_a_large_burst_is_written_without_waiting_for_the_loop(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """Past 64 KiB the buffer is written mid-iteration, bounding its memory."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=0))
    log = attach(sink)
    for number in range(2_000):
        log.info("burst line %04d %s", number, "z" * 40)
    assert path.stat().st_size >= 64 * 1024


async def test_close_writes_every_buffered_line(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """close() flushes, detaches and is idempotent; fileno() is then None."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path)))
    sink.install()
    log = attach(sink)
    for number in range(100):
        log.info("line %d", number)
    sink.close()
    sink.close()
    assert sink.handler not in logging.getLogger().handlers
    assert sink.fileno() is None
    assert len(read_log(path)) == 101
    log.info("after close")  # dropped, not an error
    assert len(read_log(path)) == 101


async def test_flush_writes_buffered_lines(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """flush() writes the batch without waiting for the loop."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path)))
    log = attach(sink)
    log.info("pending")
    sink.flush()
    assert read_log(path)[0].endswith("pending")


def test_a_write_stranded_on_a_closed_loop_is_not_lost(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """A loop closed before its scheduled write ran: the next record writes both, in order."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path)))
    log = attach(sink)
    loop = asyncio.new_event_loop()

    def log_and_stop() -> None:
        log.info("one")
        loop.stop()  # the loop exits before the write scheduled by "one" runs

    loop.call_soon(log_and_stop)
    loop.run_forever()
    loop.close()
    assert path.read_text() == ""
    log.info("two")  # no loop now: written at once
    assert [line.split("] ")[1] for line in read_log(path)] == ["one", "two"]

    async def three() -> None:
        log.info("three")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(three())  # a new loop schedules its own write
    # "two" was written a moment ago, so "three" may wait out the flush interval; closing
    # the sink writes whatever is left.
    sink.close()
    assert read_log(path)[-1].endswith("three")


async def test_threads_and_the_loop_never_interleave_lines(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """Records from worker threads and the loop all arrive, each line whole."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=32_768))
    log = attach(sink)
    per_thread = 2_000
    start = threading.Barrier(3)

    def worker(name: str) -> None:
        start.wait(timeout=10)
        for number in range(per_thread):
            log.info("%s %04d %s", name, number, "w" * (number % 50))

    async def on_loop() -> None:
        for number in range(per_thread):
            log.info("loop %04d %s", number, "w" * (number % 50))
            if number % 10 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(
        asyncio.to_thread(worker, "t1"),
        asyncio.to_thread(worker, "t2"),
        asyncio.to_thread(worker, "t3"),
        on_loop(),
    )
    sink.close()

    pattern = re.compile(rf"{STAMP} \[-\] (t1|t2|t3|loop) (\d{{4}}) (w*)")
    seen: dict[str, list[int]] = {"t1": [], "t2": [], "t3": [], "loop": []}
    for file in log_files(path):
        assert file.stat().st_size <= 32_768
        for line in read_log(file):
            match = pattern.fullmatch(line)
            assert match, line
            assert len(match.group(3)) == int(match.group(2)) % 50
            seen[match.group(1)].append(int(match.group(2)))
    assert all(numbers == list(range(per_thread)) for numbers in seen.values())


# Syslog


@pytest.fixture
def syslog_socket(short_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    """A unix datagram socket bound where a syslog daemon's /dev/log would be."""
    path = str(short_dir / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(10)
        yield path, server


def test_syslog_sends_rfc3164_with_tag_pid_and_facility(
    open_sink: OpenSink, syslog_socket: tuple[str, socket.socket]
) -> None:
    """Each message is <PRI>prefix[pid]: [context] message, as SysLogHandler frames it."""
    path, server = syslog_socket
    sink = open_sink(
        LogConfig(syslog=True, syslog_address=path, prefix="poetry", syslog_facility="daemon")
    )
    assert sink.description == f"syslog at {path}"
    assert sink.fileno() is None
    sink.install()
    pid = os.getpid()
    daemon = 3 << 3
    logging.getLogger("tend.poetry.server").warning("slow client %s", "127.0.0.1:1")
    # The first lines wait until tend settles which process serves, an error, or the end.
    sink.close()
    assert server.recv(4096) == f"<{daemon | 6}>poetry[{pid}]: [-] Log opened.\0".encode()
    assert (
        server.recv(4096)
        == f"<{daemon | 4}>poetry[{pid}]: [tend.poetry.server] slow client 127.0.0.1:1\0".encode()
    )


def test_syslog_sends_each_traceback_line_as_a_message(
    open_sink: OpenSink, attach: Attach, syslog_socket: tuple[str, socket.socket]
) -> None:
    """A traceback is sent line by line, each message tagged, as twistd's SyslogObserver."""
    path, server = syslog_socket
    sink = open_sink(LogConfig(syslog=True, syslog_address=path))
    log = attach(sink)
    try:
        1 / 0  # noqa: B018 -- the exception is the point
    except ZeroDivisionError:
        log.exception("boom")
    user_error = (1 << 3) | 3
    head = f"<{user_error}>tend[{os.getpid()}]: [-] "
    first = server.recv(4096).decode()
    second = server.recv(4096).decode()
    assert first == f"{head}boom\0"
    assert second == f"{head}Traceback (most recent call last):\0"
    messages: list[str] = []
    while not messages or "ZeroDivisionError" not in messages[-1]:
        messages.append(server.recv(4096).decode())
    assert all(message.startswith(head) for message in messages)


def test_syslog_reports_the_pid_of_a_forked_process(
    open_sink: OpenSink, attach: Attach, syslog_socket: tuple[str, socket.socket]
) -> None:
    """The pid is read per message: a daemon opens syslog, then forks its workers."""
    path, server = syslog_socket
    sink = open_sink(LogConfig(syslog=True, syslog_address=path))
    log = attach(sink)
    sink.settle()  # as tend does once it knows it serves, before it forks workers
    child = os.fork()
    if child == 0:  # pragma: no cover -- runs in the child
        try:
            log.info("from the child")
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    assert server.recv(4096) == f"<14>tend[{child}]: [-] from the child\0".encode()


def test_syslog_first_lines_carry_the_pid_of_the_process_that_forked_on(
    open_sink: OpenSink, syslog_socket: tuple[str, socket.socket]
) -> None:
    """Lines logged before a detach are sent by the detached daemon, with its pid, once."""
    path, server = syslog_socket
    sink = open_sink(LogConfig(syslog=True, syslog_address=path))
    sink.install()
    logging.getLogger("tend").info("starting up")
    sink.flush()  # as tend does before it detaches: the lines still wait
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover -- runs in the child, which detaches
        try:
            os.close(read)
            os.setsid()
            sink.settle()  # as the daemon does once detached
            logging.getLogger("tend").info("the daemon")
            sink.close()
            os.write(write, b".")
        finally:
            os._exit(0)
    os.close(write)
    os.read(read, 1)
    os.close(read)
    os.waitpid(child, 0)
    sink.close()  # the launcher: its copy of the lines is not sent again
    server.settimeout(0.5)
    received = []
    with contextlib.suppress(TimeoutError):
        while True:
            received.append(server.recv(4096).decode())
    assert received == [
        f"<14>tend[{child}]: [-] Log opened.\0",
        f"<14>tend[{child}]: [-] starting up\0",
        f"<14>tend[{child}]: [-] the daemon\0",
    ]


def test_syslog_over_udp(open_sink: OpenSink, attach: Attach) -> None:
    """HOST:PORT sends UDP datagrams there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(10)
        port = server.getsockname()[1]
        sink = open_sink(
            LogConfig(syslog=True, syslog_address=f"127.0.0.1:{port}", syslog_facility="local3")
        )
        assert sink.description == f"syslog at 127.0.0.1:{port}"
        log = attach(sink)
        log.error("over udp")
        local3_error = (19 << 3) | 3
        assert server.recv(4096) == f"<{local3_error}>tend[{os.getpid()}]: [-] over udp\0".encode()


def test_syslog_json_format(
    open_sink: OpenSink, attach: Attach, syslog_socket: tuple[str, socket.socket]
) -> None:
    """format='json' sends one JSON object per syslog message, after the tag."""
    path, server = syslog_socket
    sink = open_sink(LogConfig(syslog=True, syslog_address=path, format="json"))
    attach(sink).info("hello", extra={"peer": "x"})
    sink.close()  # sends the first lines, which wait for settle(), an error or the end
    head, body = server.recv(4096).decode().rstrip("\0").split(": ", 1)
    assert head == f"<14>tend[{os.getpid()}]"
    assert json.loads(body)["peer"] == "x"


def test_missing_syslog_socket_is_a_log_error(short_dir: Path) -> None:
    """A missing /dev/log is reported at open, not silently later."""
    path = short_dir / "missing"
    with pytest.raises(LogError) as raised:
        open_log(LogConfig(syslog=True, syslog_address=str(path)))
    assert str(raised.value) == f"cannot reach syslog at {path}: No such file or directory"


def test_unknown_syslog_facility_is_a_log_error() -> None:
    """A facility name SysLogHandler does not know is refused with the choices."""
    with pytest.raises(
        LogError, match=r"cannot use syslog facility 'bogus': choose one of .*local0"
    ):
        open_log(LogConfig(syslog=True, syslog_facility="bogus"))


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("/dev/log", "/dev/log"),
        ("run/log", "run/log"),
        ("127.0.0.1:514", ("127.0.0.1", 514)),
        ("logs.example.com:5140", ("logs.example.com", 5140)),
        ("[::1]:514", ("::1", 514)),
    ],
)
def test_parse_syslog_address(text: str, address: str | tuple[str, int]) -> None:
    """A path stays a path; HOST:PORT and [IPV6]:PORT become a UDP address."""
    assert parse_syslog_address(text) == address


@pytest.mark.parametrize(
    "text", ["", "host:", "host:abc", "host:0", "host:65536", "::1:514", ":514"]
)
def test_parse_syslog_address_refuses_bad_addresses(text: str) -> None:
    """Empty, portless, non-numeric, out-of-range and unbracketed IPv6 addresses are refused."""
    with pytest.raises(LogError, match=r"cannot use syslog address"):
        parse_syslog_address(text)


def test_bad_rotation_settings_are_log_errors() -> None:
    """Negative max_bytes or backups are refused."""
    with pytest.raises(LogError, match="cannot rotate logs at -1 bytes"):
        open_log(LogConfig(max_bytes=-1))
    with pytest.raises(LogError, match="cannot keep -1 rotated logs"):
        open_log(LogConfig(backups=-1))


def test_install_after_close_is_refused(open_sink: OpenSink) -> None:
    """A closed sink cannot be installed again."""
    sink = open_sink(LogConfig(), io.StringIO())
    sink.close()
    with pytest.raises(RuntimeError, match="is closed"):
        sink.install()


# The hot path


def test_cached_line_heads_follow_the_second_and_the_context(open_sink: OpenSink) -> None:
    """Each record gets its own second's stamp and its own context, whatever came before."""
    sink = open_sink(LogConfig())
    formatter = sink.handler.formatter
    assert formatter is not None

    def record(created: float, name: str = "tend.poetry.server", **extra: object) -> str:
        made = logging.makeLogRecord({"name": name, "msg": "hi", "created": created, **extra})
        return formatter.format(made)

    first, again, later = record(1e9), record(1e9 + 0.5), record(1e9 + 1)
    assert first == again
    assert first != later
    assert later.endswith(" [tend.poetry.server] hi")
    assert record(1e9, context="PoetryProtocol,0").endswith(" [PoetryProtocol,0] hi")
    assert record(1e9, name="tend").endswith(" [-] hi")
    assert record(1e9) == first
    assert record(1e9, msg="a\nb").splitlines() == [first[:-2] + "a", first[:-2] + "b"]


def test_handler_filters_still_drop_records(open_sink: OpenSink, attach: Attach) -> None:
    """A filter on tend's handler drops records as on any logging handler."""
    out = io.StringIO()
    sink = open_sink(LogConfig(), out)
    sink.handler.addFilter(lambda record: "secret" not in record.getMessage())
    logger = attach(sink)
    logger.info("public")
    logger.info("a secret")
    sink.flush()
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == ["public"]


def test_a_user_formatter_on_the_handler_sees_where_each_call_was_made(
    open_sink: OpenSink,
) -> None:
    """tend changes nothing in how logging makes records: file, function and line are true."""
    out = io.StringIO()
    sink = open_sink(LogConfig(), out)
    sink.handler.setFormatter(
        logging.Formatter(
            "%(filename)s %(module)s %(funcName)s %(lineno)d %(levelname)s %(message)s"
        )
    )
    sink.install()
    line = sys._getframe().f_lineno + 1
    logging.getLogger("tend.poetry.server").warning("hello %s", "there")
    assert out.getvalue().splitlines()[-1] == (
        "test_logs.py test_logs test_a_user_formatter_on_the_handler_sees_where_each_call_was_made "
        f"{line} WARNING hello there"
    )
    assert logging.getLogRecordFactory() is logging.LogRecord


async def test_a_thread_writes_at_once_while_the_loop_has_a_write_scheduled(
    open_sink: OpenSink, attach: Attach, tmp_path: Path
) -> None:
    """A thread without a loop writes at once, even while the loop's write is pending."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path)))
    log = attach(sink)
    log.info("loop")  # schedules a write on this loop
    log.info("loop again")  # joins it
    assert path.read_text() == ""
    thread = threading.Thread(target=log.info, args=("thread",))
    thread.start()
    thread.join()
    assert [line.split("] ")[1] for line in read_log(path)] == ["loop", "loop again", "thread"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_wait_for_its_parents_scheduled_write(tmp_path: Path) -> None:
    """A child forked inside the loop writes its lines at once, not on the parent's loop."""
    path = tmp_path / "tend.log"
    run_child(
        f"""
        import asyncio, logging, os
        from tend.logs import LogConfig, open_log
        open_log(LogConfig(logfile={str(path)!r})).install()
        log = logging.getLogger("tend.test")

        async def main():
            log.info("parent")  # schedules a write on this loop
            pid = os.fork()
            if pid == 0:
                log.info("child")  # the copied loop is not running here
                os._exit(0)
            os.waitpid(pid, 0)

        asyncio.run(main())
        """
    )
    assert "child" in [line.split("] ")[1] for line in read_log(path)]


def test_a_message_argument_may_log_while_formatted(open_sink: OpenSink, attach: Attach) -> None:
    """An argument whose __str__ logs re-enters the handler without deadlocking."""
    out = io.StringIO()
    sink = open_sink(LogConfig(), out)
    log = attach(sink)

    class Noisy:
        def __str__(self) -> str:
            log.info("inner")
            return "noisy"

    log.info("outer %s", Noisy())
    sink.flush()
    assert [line.split("] ")[1] for line in out.getvalue().splitlines()] == [
        "inner",
        "outer noisy",
    ]


# The access log


class RecordingHandler(logging.Handler):
    """An application's own handler: keeps every record it is handed."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


Subscribe = Callable[[logging.Handler], None]


@pytest.fixture
def subscribe() -> Iterator[Subscribe]:
    """AccessLog.subscribe, with every handler unsubscribed at the end."""
    subscribed: list[logging.Handler] = []

    def subscribe_(handler: logging.Handler) -> None:
        AccessLog.subscribe(handler)
        subscribed.append(handler)

    yield subscribe_
    for handler in subscribed:
        AccessLog.unsubscribe(handler)


@pytest.fixture
def set_level() -> Iterator[Callable[[str, int], None]]:
    """Logger.setLevel, with each logger's level restored at the end."""
    changed: list[tuple[logging.Logger, int]] = []

    def set_level_(name: str, level: int) -> None:
        logger = logging.getLogger(name)
        changed.append((logger, logger.level))
        logger.setLevel(level)

    yield set_level_
    for logger, level in reversed(changed):
        logger.setLevel(level)


def test_access_log_is_public() -> None:
    """tend.AccessLog is the public name of the access log."""
    assert "AccessLog" in tend.__all__
    assert tend.AccessLog is AccessLog
    assert repr(AccessLog("tend.poetry.server")) == "<AccessLog tend.poetry.server>"


@pytest.mark.parametrize("kind", ["text", "json", "journald"])
def test_access_lines_read_like_logging_lines(
    open_sink: OpenSink,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    """An access line is the line logging.getLogger(name) would have written, in each format,
    written without a LogRecord."""
    if kind == "journald":
        status = os.fstat(2)
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
    out = io.StringIO()
    config = LogConfig(format="json" if kind == "json" else "text", level=logging.DEBUG)
    sink = open_sink(config, out)
    sink.install()
    name = "app.access.formats"
    log, access = logging.getLogger(name), AccessLog(name)

    def written(call: Callable[..., None], *args: object) -> list[object]:
        start = len(out.getvalue())
        call(*args)
        text = out.getvalue()[start:]
        assert text
        if kind == "json":
            documents = [json.loads(line) for line in text.splitlines()]
            return [{**document, "time": "T"} for document in documents]
        return [re.sub(STAMP, "T", line) for line in text.splitlines()]

    calls: list[tuple[str, tuple[object, ...]]] = [
        ("debug", ("one %s",)),
        ("info", ("sending %d bytes of poetry to %s", 3003, "127.0.0.1:58208")),
        ("warning", ("two\nlines from %s", "127.0.0.1:1")),
        ("info", ("%(peer)s left", {"peer": "127.0.0.1:2"})),
        ("info", ("100% of %s",)),
    ]
    for method, args in calls:
        assert written(getattr(access, method), *args) == written(getattr(log, method), *args)
    if kind == "journald":
        assert written(access.warning, "w") == ["<4>[app.access.formats] w"]
    # pytest's handler on the root logger saw logging's records only: access lines make none.
    assert len([r for r in caplog.records if r.name == name]) == len(calls)


def test_access_lines_reach_syslog_as_logging_lines_do(
    open_sink: OpenSink, syslog_socket: tuple[str, socket.socket]
) -> None:
    """Through syslog, an access line is sent as the same messages as a logging line."""
    path, server = syslog_socket
    sink = open_sink(LogConfig(syslog=True, syslog_address=path, syslog_facility="daemon"))
    sink.install()
    logging.getLogger("tend").error("an error sends the first lines at once")
    server.recv(4096)  # Log opened.
    server.recv(4096)  # the error
    name = "app.access.syslog"
    for level in ("info", "warning"):
        getattr(logging.getLogger(name), level)("to %s\nand on", "127.0.0.1:1")
        getattr(AccessLog(name), level)("to %s\nand on", "127.0.0.1:1")
        expected = [server.recv(4096), server.recv(4096)]
        assert [server.recv(4096), server.recv(4096)] == expected
    assert expected[0] == f"<28>tend[{os.getpid()}]: [{name}] to 127.0.0.1:1\0".encode()


def test_access_lines_honour_the_log_level(open_sink: OpenSink) -> None:
    """A log opened at WARNING (--log-level warning) silences access lines at INFO."""
    out = io.StringIO()
    open_sink(LogConfig(level=logging.WARNING), out).install()
    access = AccessLog("app.access.level")
    access.info("hidden")
    access.warning("shown")
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == ["shown"]


def test_access_lines_honour_each_loggers_level(
    open_sink: OpenSink, set_level: Callable[[str, int], None]
) -> None:
    """A level set on the logger or a parent, or logging.disable, applies as to logging."""
    out = io.StringIO()
    open_sink(LogConfig(), out).install()
    access = AccessLog("app.quiet.server")
    set_level("app.quiet.server", logging.WARNING)
    access.info("hidden by its own level")
    set_level("app.quiet.server", logging.NOTSET)
    set_level("app.quiet", logging.WARNING)
    access.info("hidden by its parent's level")
    set_level("app.quiet", logging.DEBUG)
    access.debug("shown at debug")
    logging.disable(logging.INFO)
    try:
        access.info("hidden by logging.disable")
    finally:
        logging.disable(logging.NOTSET)
    access.info("shown")
    messages = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()[1:]]
    assert messages == ["shown at debug", "shown"]


def test_access_line_arguments_are_formatted_only_when_written(open_sink: OpenSink) -> None:
    """A silenced line costs no formatting: its arguments' __str__ is never called."""
    formatted: list[str] = []

    class Peer:
        def __str__(self) -> str:
            formatted.append("peer")
            return "127.0.0.1:1"

    out = io.StringIO()
    open_sink(LogConfig(level=logging.WARNING), out).install()
    AccessLog("app.access.lazy").info("sending to %s", Peer())
    assert formatted == []
    AccessLog("app.access.lazy").warning("slow client %s", Peer())
    assert formatted == ["peer"]
    assert out.getvalue().endswith("[app.access.lazy] slow client 127.0.0.1:1\n")


async def test_access_lines_join_the_file_in_order_with_every_other_line(
    open_sink: OpenSink, tmp_path: Path
) -> None:
    """Access and logging lines share one buffer: one file, rotated alike, in call order."""
    path = tmp_path / "tend.log"
    max_bytes = 4096
    sink = open_sink(LogConfig(logfile=str(path), max_bytes=max_bytes))
    sink.install()
    log, access = logging.getLogger("app.mixed"), AccessLog("app.mixed")
    expected = []
    for number in range(1_000):
        if number % 3 == 0:
            log.info("logging %04d", number)
        elif number % 100 == 1:
            log.error("error %04d", number)  # written at once, with what is buffered
        else:
            access.info("access %04d", number)
        expected.append(number)
        if number % 17 == 0:
            await asyncio.sleep(0)
    sink.close()
    files = log_files(path)
    assert len(files) > 5
    assert all(file.stat().st_size <= max_bytes for file in files)
    lines = [line for file in files for line in read_log(file)][1:]  # after Log opened.
    pattern = re.compile(rf"{STAMP} \[app\.mixed\] (logging|error|access) (\d{{4}})")
    matches = [pattern.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert [int(match.group(2)) for match in matches if match] == expected


def test_access_lines_fall_back_to_logging_without_a_sink(
    caplog: pytest.LogCaptureFixture, open_sink: OpenSink
) -> None:
    """With no sink installed (a library, a test) an access line is a logging call."""
    caplog.set_level(logging.INFO, logger="app.access.fallback")
    access = AccessLog("app.access.fallback")
    line = sys._getframe().f_lineno + 1
    access.info("sending %d bytes of poetry to %s", 3003, "127.0.0.1:1")
    (record,) = [r for r in caplog.records if r.name == "app.access.fallback"]
    assert (record.levelno, record.getMessage()) == (
        logging.INFO,
        "sending 3003 bytes of poetry to 127.0.0.1:1",
    )
    assert (record.filename, record.lineno, record.funcName) == (
        "test_logs.py",
        line,
        "test_access_lines_fall_back_to_logging_without_a_sink",
    )
    # Once a sink is closed, its lines go back to logging too.
    sink = open_sink(LogConfig(), io.StringIO())
    sink.install()
    access.info("to the sink")
    sink.close()
    access.info("after the close")
    messages = [r.getMessage() for r in caplog.records if r.name == "app.access.fallback"]
    assert messages == ["sending 3003 bytes of poetry to 127.0.0.1:1", "after the close"]


def test_a_subscriber_receives_a_record_of_each_access_line(
    open_sink: OpenSink, subscribe: Subscribe
) -> None:
    """A subscribed handler is handed a true LogRecord: name, level, message and caller."""
    out = io.StringIO()
    open_sink(LogConfig(), out).install()
    everything, warnings = RecordingHandler(), RecordingHandler(logging.WARNING)
    subscribe(everything)
    subscribe(warnings)
    subscribe(everything)  # once is enough
    access = AccessLog("app.access.subscribed")
    line = sys._getframe().f_lineno + 1
    access.info("sending %d bytes of poetry to %s", 3003, "127.0.0.1:1")
    access.debug("below the log's level: no one sees it")
    access.warning("slow client %s", "127.0.0.1:2")

    first, second = everything.records
    assert (first.name, first.levelno, first.levelname) == (
        "app.access.subscribed",
        logging.INFO,
        "INFO",
    )
    assert first.getMessage() == "sending 3003 bytes of poetry to 127.0.0.1:1"
    assert (first.filename, first.lineno, first.funcName) == (
        "test_logs.py",
        line,
        "test_a_subscriber_receives_a_record_of_each_access_line",
    )
    assert second.getMessage() == "slow client 127.0.0.1:2"
    assert warnings.records == [second]
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == [
        "Log opened.",
        "sending 3003 bytes of poetry to 127.0.0.1:1",
        "slow client 127.0.0.1:2",
    ]
    AccessLog.unsubscribe(everything)
    access.info("after unsubscribing")
    assert len(everything.records) == 2


def test_a_subscriber_also_on_a_logger_gets_each_access_line_once(
    caplog: pytest.LogCaptureFixture, subscribe: Subscribe
) -> None:
    """Without a sink, a subscriber that logging reaches anyway is not handed the line twice."""
    caplog.set_level(logging.INFO, logger="app.access.once")
    on_the_logger, elsewhere = RecordingHandler(), RecordingHandler()
    logger = logging.getLogger("app.access")
    logger.addHandler(on_the_logger)
    try:
        subscribe(on_the_logger)
        subscribe(elsewhere)
        AccessLog("app.access.once").info("hello")
    finally:
        logger.removeHandler(on_the_logger)
    assert [r.getMessage() for r in on_the_logger.records] == ["hello"]
    assert elsewhere.records == on_the_logger.records
    assert [r.getMessage() for r in caplog.records if r.name == "app.access.once"] == ["hello"]


def test_filters_and_a_user_formatter_still_apply_to_access_lines(
    open_sink: OpenSink,
) -> None:
    """A filter on the logger or on tend's handler, or a formatter of the user's, sees access
    lines as records, so each still does its work."""
    out = io.StringIO()
    sink = open_sink(LogConfig(), out)
    sink.install()
    access = AccessLog("app.access.filtered")
    logger = logging.getLogger("app.access.filtered")

    def no_secrets(record: logging.LogRecord) -> bool:
        return "secret" not in record.getMessage()

    sink.handler.addFilter(no_secrets)
    access.info("public one")
    access.info("a secret")
    sink.handler.removeFilter(no_secrets)
    logger.addFilter(no_secrets)
    try:
        access.info("public two")
        access.info("another secret")
    finally:
        logger.removeFilter(no_secrets)
    sink.handler.setFormatter(logging.Formatter("%(funcName)s:%(lineno)d %(message)s"))
    line = sys._getframe().f_lineno + 1
    access.info("formatted by the user")
    lines = out.getvalue().splitlines()[1:]
    assert [line.split("] ", 1)[1] for line in lines[:2]] == ["public one", "public two"]
    assert lines[2:] == [
        f"test_filters_and_a_user_formatter_still_apply_to_access_lines:{line} "
        "formatted by the user"
    ]


def test_an_access_line_with_bad_arguments_is_reported_and_logging_goes_on(
    open_sink: OpenSink, capsys: pytest.CaptureFixture[str]
) -> None:
    """Arguments that do not fit the message are reported as logging reports them."""
    out = io.StringIO()
    open_sink(LogConfig(), out).install()
    access = AccessLog("app.access.bad")
    access.info("%d bytes", "many")
    access.info("%d bytes", 10)
    assert out.getvalue().splitlines()[-1].endswith("[app.access.bad] 10 bytes")
    error = capsys.readouterr().err
    assert "--- Logging error ---" in error
    assert "Message: '%d bytes'" in error


def test_access_lines_are_relayed_from_a_forked_worker(open_sink: OpenSink, tmp_path: Path) -> None:
    """A worker's access lines go down its relay pipe with its other lines, in order."""
    path = tmp_path / "tend.log"
    sink = open_sink(LogConfig(logfile=str(path)))
    sink.install()
    log, access = logging.getLogger("app.worker"), AccessLog("app.worker")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover -- runs in the worker
        status = 1
        try:
            os.close(read_end)
            sink.relay_to(write_end)
            for number in range(1_000):
                if number % 2:
                    access.info("access %04d", number)
                else:
                    log.info("logging %04d", number)
            sink.close()
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    pending = b""
    with open(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65_536):
            complete, _, pending = (pending + chunk).rpartition(RECORD_END)
            if complete:
                sink.write_lines(complete.decode().split(RECORD_END.decode()))
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    sink.close()
    assert [line.split("] ", 1)[1] for line in read_log(path)] == [
        "Log opened.",
        *(f"{'access' if n % 2 else 'logging'} {n:04d}" for n in range(1_000)),
    ]


def test_an_access_line_of_a_logger_that_does_not_propagate_stays_with_its_handlers(
    open_sink: OpenSink,
) -> None:
    """propagate = False on the logger keeps its access lines out of tend's log, as logging's."""
    out = io.StringIO()
    sink = open_sink(LogConfig(), stdout=out)
    sink.install()
    own = io.StringIO()
    logger = logging.getLogger("app.quiet")
    handler = logging.StreamHandler(own)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        AccessLog("app.quiet").info("served %d", 1)
        sink.flush()
    finally:
        logger.propagate = True
        logger.removeHandler(handler)
    assert "served 1" not in out.getvalue()
    assert own.getvalue() == "served 1\n"
