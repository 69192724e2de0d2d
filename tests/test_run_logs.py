"""Log destinations and formats as a running tend writes them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import POEM, TEND, fetch, wait_until

LOCAL = ["poetry", "--port", "0", "--iface", "127.0.0.1"]


def test_json_lines_parse_one_by_one(run_tend):
    """--log-format json: every line of a run is one JSON object with the documented keys."""
    tend = run_tend("--nodaemon", "--pidfile", "", "--log-format", "json", *LOCAL)
    line = tend.wait_for_output(r'"message": "PoetryFactory starting on \d+"').group(0)
    port = int(line.rsplit(" ", 1)[1].rstrip('"'))
    fetch(port)
    tend.wait_for_output("sending 2807 bytes")
    assert tend.stop() == 0
    records = [json.loads(text) for text in tend.stdout.splitlines()]
    assert records[0]["message"] == "Log opened."
    assert records[-1]["message"] == "Server Shut Down."
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys()
        assert record["time"][:2] == "20"
        assert record["time"][-6] in "+-"
    sent = [r for r in records if r["message"].startswith("sending")]
    assert sent[0]["logger"] == "tend.poetry.server"
    assert sent[0]["level"] == "info"


def test_journal_gets_priorities_instead_of_timestamps(tmp_path):
    """With standard error on the journal (JOURNAL_STREAM matches it), lines start with <N>."""
    script = (
        "import os, subprocess, sys\n"
        "st = os.fstat(2)\n"
        "env = dict(os.environ, JOURNAL_STREAM=f'{st.st_dev}:{st.st_ino}')\n"
        "sys.exit(subprocess.call(sys.argv[1:], env=env))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *TEND, "--nodaemon", "--pidfile", "", "poetry",
         "--poem", "missing.txt", "--port", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0] == "<6>[-] Log opened."
    assert any(line.startswith("<3>[-] tend: cannot read poem file") for line in lines)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_failed_start_is_said_once_when_both_streams_are_the_journal(tmp_path, workers):
    """Under systemd standard output and error are one journal stream: the failure's line,
    logged there, is not printed on standard error a second time."""
    journal = tmp_path / "journal"
    script = (
        "import os, subprocess, sys\n"
        f"fd = os.open({str(journal)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)\n"
        "st = os.fstat(fd)\n"
        "env = dict(os.environ, JOURNAL_STREAM=f'{st.st_dev}:{st.st_ino}')\n"
        "sys.exit(subprocess.call(sys.argv[1:], env=env, stdout=fd, stderr=fd))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *TEND, "--nodaemon", "--pidfile", "", "--workers",
         workers, "poetry", "--poem", "missing.txt", "--port", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    said = [line for line in journal.read_text().splitlines() if "cannot read poem" in line]
    assert len(said) == 1, journal.read_text()
    assert said[0].startswith("<3>[-] tend: cannot read poem file")


def test_syslog_receives_rfc3164_messages(run_tend, tmp_path):
    """--syslog sends each line to the syslog socket, tagged with --prefix and the pid."""
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(path))
        syslog.settimeout(10)
        tend = run_tend("--nodaemon", "--pidfile", "", "--syslog", "--syslog-address", str(path),
                        "--prefix", "poetry", "--syslog-facility", "daemon", *LOCAL)  # fmt: skip
        messages: list[str] = []

        def started() -> bool:
            messages.append(syslog.recv(4096).decode())
            return "starting on" in messages[-1]

        wait_until(started)
        assert tend.stop() == 0
    # daemon (3) * 8 + info (6) = 30
    assert messages[0].startswith(f"<30>poetry[{tend.pid}]: [-] Log opened.")
    assert tend.stdout == ""


def test_missing_syslog_socket_is_a_clear_error(tmp_path):
    """A syslog socket that is not there is a start-up error naming it."""
    result = subprocess.run(
        [*TEND, "--nodaemon", "--syslog", "--syslog-address", str(tmp_path / "nope"), *LOCAL],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"tend: cannot reach syslog at {tmp_path / 'nope'}: No such file or directory"
    )


@pytest.mark.parametrize("option", [["--log-format", "xml"], ["--log-max-bytes", "lots"]])
def test_bad_log_options_are_usage_errors(tmp_path, option):
    """A log option with a bad value is a usage error naming it."""
    result = subprocess.run(
        [*TEND, *option, *LOCAL], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"argument {option[0]}" in result.stderr
    assert not os.path.exists(tmp_path / "tend.pid")


APP_WITH_ITS_OWN_HANDLER = """\
import logging

import tend

handler = logging.FileHandler("app.log")
handler.setFormatter(logging.Formatter("%(filename)s:%(lineno)d %(funcName)s %(message)s"))
log = logging.getLogger("greeter")
log.addHandler(handler)
access = tend.AccessLog("greeter")
tend.AccessLog.subscribe(handler)


class Greeter(tend.Service):
    async def start_service(self):
        log.info("greeter starting")
        access.info("greeter access line")
        await super().start_service()


application = tend.Application("greeter")
Greeter().set_service_parent(application)
"""


def test_an_app_handler_sees_the_app_files_name_line_and_function(run_tend, tmp_path):
    """tend leaves logging's records alone: an app's own handler shows where it logged, and
    so does a handler subscribed to the access log."""
    (tmp_path / "app.py").write_text(APP_WITH_ITS_OWN_HANDLER)
    lines = APP_WITH_ITS_OWN_HANDLER.splitlines()
    logged = lines.index('        log.info("greeter starting")') + 1
    accessed = lines.index('        access.info("greeter access line")') + 1
    tend = run_tend("--nodaemon", "--pidfile=", "-y", "app.py")
    tend.wait_for_output(r"\[greeter\] greeter starting\n.* \[greeter\] greeter access line$")
    assert tend.stop() == 0
    assert (tmp_path / "app.log").read_text().splitlines() == [
        f"app.py:{logged} start_service greeter starting",
        f"app.py:{accessed} start_service greeter access line",
    ]


TRACEBACK_APP = """
import logging, tend

log = logging.getLogger("app")

class Noisy(tend.Service):
    async def start_service(self):
        for number in range(60):
            try:
                raise ValueError(f"boom {number}")
            except ValueError:
                log.exception("record %d", number)
        await super().start_service()

application = tend.Application("noisy")
Noisy("noisy").set_service_parent(application)
"""


def test_a_workers_traceback_is_never_split_across_rotated_files(run_tend, tmp_path):
    """Records relayed from a worker stay whole: rotation happens between them."""
    app = tmp_path / "app.py"
    app.write_text(TRACEBACK_APP)
    log = tmp_path / "tend.log"
    tend = run_tend("--nodaemon", "--pidfile=", "-l", str(log), "--log-max-bytes", "3000",
                    "-y", str(app))  # fmt: skip
    tend.wait_for_output(r"record 59", source=str(log))
    # The records are logged while the tree starts: a stop that comes before the worker
    # said READY is a stop during the start (exit 1), which is as good here.
    assert tend.stop() in (0, 1)
    files = sorted(tmp_path.glob("tend.log*"))
    assert len(files) > 5
    for file in files:
        text = file.read_text()
        for number in range(60):
            if f"] record {number}\n" in text:
                assert f"ValueError: boom {number}\n" in text, (file, number)
            if f"ValueError: boom {number}\n" in text:
                assert f"] record {number}\n" in text, (file, number)


def test_a_detached_daemons_first_syslog_lines_carry_its_pid(tmp_path, daemons):
    """`Log opened.` and `starting up`, logged before tend detaches, name the daemon's pid."""
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(path))
        syslog.settimeout(10)
        subprocess.run(
            [*TEND, "--syslog", "--syslog-address", str(path), *LOCAL],
            cwd=tmp_path, check=True, timeout=60,
        )  # fmt: skip
        daemon = int((tmp_path / "tend.pid").read_text())
        daemons.add(daemon)
        first, second = syslog.recv(4096).decode(), syslog.recv(4096).decode()
    assert first.startswith(f"<14>tend[{daemon}]: [-] Log opened.")
    assert second.startswith(f"<14>tend[{daemon}]: [-] tend ")


HUGE_RECORD_APP = """
import logging, tend
from tend.poetry.server import PoetryFactory, PoetryService

class Loud(PoetryService):
    async def start_service(self):  # in the worker, which relays its records
        logging.getLogger("app").warning("A" * 1_000_000)
        logging.getLogger("app").warning("the record after")
        await super().start_service()

application = tend.Application("huge")
poetry = Loud({poem!r})
poetry.set_service_parent(application)
tend.TCPServer(0, PoetryFactory(poetry), interface="127.0.0.1").set_service_parent(application)
"""


def test_a_workers_huge_record_is_cut_and_the_next_ones_kept(run_tend, tmp_path):
    """A worker's record past 256 KiB is written cut, with a mark, and the rest dropped:
    a worker (which an attacker may run code in) cannot grow the root supervisor's memory
    or one line of its log at will; the records after it arrive as ever."""
    app = tmp_path / "app.py"
    app.write_text(HUGE_RECORD_APP.format(poem=str(POEM)))
    log = tmp_path / "tend.log"
    tend = run_tend("--nodaemon", "--pidfile=", "-l", str(log), "-y", str(app))
    tend.wait_for_output(r"the record after", source=str(log))
    assert tend.stop() in (0, 1)
    lines = log.read_text().splitlines()
    (cut,) = [line for line in lines if "AAAA" in line]
    assert cut.endswith(" [cut: a record over 262144 bytes]")
    assert len(cut) < 262144 + 200
    assert any(line.endswith("the record after") for line in lines)
