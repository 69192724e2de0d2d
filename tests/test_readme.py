"""The README's first five minutes, typed as written, in a fresh clone.

Every fenced ``sh`` command of the quick start and of "Running as a daemon" (with
"Graceful drain"), and every ``$`` line of "Without a supervisor: tendctl", runs in a
`git clone` of this repository, one after another as a reader would type them, from the
top of the clone. The clone reuses this venv (its ``.venv`` is a link to ours), so
``make run`` does not install anything again. As root, the commands run in a network
namespace of their own, where port 10000 is theirs whatever else runs on this machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import POEM, Spawned, wait_until

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
README = (REPO / "README.md").read_text()

# Commands not run, and why.
NOT_RUN = {
    "make test": "this test runs inside make test",
    "make test-3.13": "runs the whole suite again under Python 3.13",
}
# Programs the README offers next to get-poetry, which a fresh machine may lack.
OPTIONAL_PROGRAMS = {"nc", "curl"}
# Commands that hold the terminal until Ctrl-C: run in the background until the end.
HOLDS_THE_TERMINAL = {"make run"}


@dataclass(frozen=True, slots=True)
class Command:
    section: str
    line: str
    expected: tuple[str, ...] = ()  # the transcript's lines after a `$ ` command


def section(heading: str, until: str) -> str:
    """The README from the line *heading* to the line *until*, not included."""
    start = README.index(f"\n{heading}\n")
    return README[start : README.index(f"\n{until}\n", start)]


def fenced(text: str) -> Iterator[tuple[str, list[str]]]:
    """Each fenced block of *text*: its language and its lines."""
    lines: list[str] | None = None
    language = ""
    for line in text.splitlines():
        if lines is None and line.startswith("```"):
            lines, language = [], line[3:].strip()
        elif lines is not None and line == "```":
            yield language, lines
            lines = None
        elif lines is not None:
            lines.append(line)


def shell_commands(name: str, text: str) -> list[Command]:
    """The commands of the ``sh`` blocks, comment-only lines and continuations joined."""
    commands = []
    for language, lines in fenced(text):
        if language != "sh":
            continue
        joined = "\n".join(lines).replace("\\\n", " ")
        commands += [Command(name, line) for line in joined.splitlines() if line.strip()]
    return commands


def transcript_commands(name: str, text: str) -> list[Command]:
    """The ``$ `` lines of plain blocks, each with the output lines shown after it."""
    commands: list[Command] = []
    for language, lines in fenced(text):
        if language:
            continue
        for line in lines:
            if line.startswith("$ "):
                commands.append(Command(name, line[2:]))
            elif commands:
                last = commands[-1]
                commands[-1] = Command(last.section, last.line, (*last.expected, line))
    return commands


def readme_commands() -> list[Command]:
    quick_start = README[: README.index("\n## ")]
    daemon = section("## Running as a daemon", "## Dropping privileges")
    tendctl = section("### Without a supervisor: tendctl", "### In a container")
    return [
        *shell_commands("quick start", quick_start),
        *shell_commands("Running as a daemon", daemon),
        *transcript_commands("Without a supervisor: tendctl", tendctl),
    ]


def test_the_sections_hold_what_a_reader_types_first() -> None:
    """The commands found are the ones a reader meets, with `make run` first."""
    lines = [command.line.split("#")[0].strip() for command in readme_commands()]
    assert lines[0] == "make run"
    assert ".venv/bin/get-poetry 10000" in lines
    assert "nc localhost 10000" in lines
    assert "kill $(cat tend.pid)" in lines
    assert ".venv/bin/tendctl stop" in lines


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A fresh clone of this repository, with the working tree's uncommitted changes."""
    if not (VENV / "bin" / "tend").exists():
        pytest.skip(f"no tend script in {VENV}")
    target = tmp_path / "tend"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(target)], check=True)
    diff = subprocess.run(
        ["git", "-C", str(REPO), "diff", "HEAD", "--binary"],
        check=True,
        capture_output=True,
    ).stdout
    if diff:
        subprocess.run(["git", "-C", str(target), "apply"], input=diff, check=True)
    (target / ".venv").symlink_to(VENV)
    # make's stamp in the venv is older than the clone's fresh pyproject.toml: date the
    # file back, or make would install the clone into our venv.
    os.utime(target / "pyproject.toml", (0, 0))
    return target


class Namespace:
    """Where the commands run: a network namespace of their own as root, else this one."""

    def __init__(self) -> None:
        self.holder: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
            self.holder = subprocess.Popen(
                ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && exec sleep 600"]
            )
            wait_until(lambda: self._lo_up())
        elif _port_taken(10000):
            pytest.skip("port 10000 is taken, and only root can make a namespace of its own")

    def _lo_up(self) -> bool:
        assert self.holder is not None
        result = subprocess.run(
            ["nsenter", "-t", str(self.holder.pid), "-n", "ip", "link", "show", "lo"],
            capture_output=True,
            text=True,
        )
        return "UP" in result.stdout.split(">")[0]

    def prefix(self) -> list[str]:
        if self.holder is None:
            return []
        return ["nsenter", "-t", str(self.holder.pid), "-n", "--"]

    def close(self) -> None:
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    handle = Namespace()
    yield handle
    handle.close()


def test_the_first_five_minutes_work_as_written(clone: Path, namespace: Namespace) -> None:
    """Each command, typed from the top of a fresh clone, succeeds and does what it says."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("VIRTUAL_ENV", "PYTHONPATH") and not key.startswith("PYTEST")
    }
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not p.startswith(str(VENV)))
    background: list[Spawned] = []
    ran: list[str] = []
    section_of_background = ""
    try:
        for command in readme_commands():
            if background and command.section != section_of_background:
                # Ctrl-C, as the quick start says, before going on: the terminal sends
                # SIGINT to the whole foreground group, make and the tend it runs.
                for server in background:
                    os.killpg(server.pid, signal.SIGINT)  # its session: still ours, unreaped
                    server.wait(30)
                    assert "Server Shut Down." in server.stdout, server.output
                background.clear()
            typed = command.line.split("  #")[0].strip()
            if not typed or typed.startswith("#") or typed in NOT_RUN:
                continue  # a comment carried on from the line above; or not run, as said
            program = typed.split()[0]
            if program in OPTIONAL_PROGRAMS and shutil.which(program) is None:
                continue  # the README says a fresh machine may not have it
            where = f"{command.section}: `{typed}`"
            if typed in HOLDS_THE_TERMINAL:
                server = Spawned([*namespace.prefix(), "bash", "-c", typed], clone, env)
                background.append(server)
                section_of_background = command.section
                server.wait_for_output(r"PoetryFactory starting on 10000", timeout=60)
                ran.append(typed)
                continue
            result = subprocess.run(
                [*namespace.prefix(), "bash", "-c", typed],
                cwd=clone,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            assert result.returncode == 0, f"{where} exited {result.returncode}:\n{result.stderr}"
            check_output(typed, result.stdout, command.expected, where)
            if typed.startswith("kill "):
                # A reader types the next command a moment later: by then tend has stopped.
                wait_until(lambda: not (clone / "tend.pid").exists(), timeout=20)
            ran.append(typed)
    finally:
        for server in background:
            server.kill()
        # Whatever a failed step left detached: its pidfile names it.
        if (clone / "tend.pid").exists():
            subprocess.run(
                [*namespace.prefix(), str(VENV / "bin" / "tendctl"), "stop", "--kill"],
                cwd=clone,
                capture_output=True,
                check=False,
            )
    assert "make run" in ran
    assert any(typed.startswith(".venv/bin/tendctl status") for typed in ran)


def check_output(typed: str, output: str, expected: tuple[str, ...], where: str) -> None:
    """A fetch prints the poem; a transcript's command prints lines shaped as shown."""
    if re.search(r"get-poetry|^nc |^curl ", typed) and ">" not in typed:
        assert output.encode() == POEM.read_bytes(), f"{where} printed {output!r}"
    if expected:
        shapes = [_shape(line) for line in expected]
        got = output.splitlines()
        assert len(got) == len(shapes), f"{where} printed {got}, the README shows {expected}"
        for line, shape in zip(got, shapes, strict=True):
            assert re.fullmatch(shape, line), f"{where} printed {line!r}, not like {shape!r}"


def _shape(line: str) -> str:
    """A transcript line as a pattern: numbers, times and paths vary, the words do not."""
    pattern = re.escape(line)
    pattern = re.sub(r"/(?:[\w.-]+/)*tend\\\.pid", r"/\\S+/tend\\.pid", pattern)
    return re.sub(r"\d+", r"\\d+", pattern)
