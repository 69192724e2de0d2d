"""Tests for tend.appfile: loading the `application` an app file defines, and its errors."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TEND

from tend.appfile import AppFileError, load_application
from tend.errors import StartupError
from tend.service import Application

WriteApp = Callable[..., Path]

GOOD = """
    import tend

    application = tend.Application("poetry", uid=1000, gid="staff")
    tend.Service("child").set_service_parent(application)
"""


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """load_application puts the file's folder on sys.path; undo that and any imports after."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("tend_test_"):
            del sys.modules[name]


@pytest.fixture
def write_app(tmp_path: Path) -> WriteApp:
    """Write an app file (dedented) into tmp_path and return its path."""

    def write(source: str, name: str = "app.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path

    return write


def assert_one_line_naming(error: AppFileError, path: Path) -> str:
    """The error's message is a single line that names the file; return it."""
    message = str(error)
    assert "\n" not in message, message
    assert str(path) in message
    return message


def test_loads_the_application_a_file_defines(write_app: WriteApp) -> None:
    """load_application returns the Application the file assigns to `application`."""
    path = write_app(GOOD)

    application = load_application(str(path))

    assert isinstance(application, Application)
    assert (application.name, application.uid, application.gid) == ("poetry", 1000, "staff")
    assert [child.name for child in application] == ["child"]


def test_loading_starts_nothing(write_app: WriteApp) -> None:
    """Loading an app file builds the tree but starts no service."""
    path = write_app(GOOD)

    application = load_application(str(path))

    assert not application.running
    assert not application.get_service_named("child").running


def test_app_file_knows_its_own_path(write_app: WriteApp) -> None:
    """`__file__` inside an app file is its absolute path, so it can find files beside it."""
    path = write_app(
        """
        import os
        import tend

        application = tend.Application(os.path.basename(os.path.dirname(__file__)))
        application.source = __file__
        """
    )

    application = load_application(str(path))

    assert application.source == str(path.resolve())  # type: ignore[attr-defined]
    assert application.name == path.parent.name


def test_app_file_can_import_its_neighbours(write_app: WriteApp) -> None:
    """An app file may import a module that sits in the same folder, as `python FILE` could."""
    write_app("GREETING = 'hello from next door'\n", name="tend_test_neighbour.py")
    path = write_app(
        """
        import tend
        import tend_test_neighbour

        application = tend.Application(tend_test_neighbour.GREETING)
        """
    )

    assert load_application(str(path)).name == "hello from next door"


def test_running_the_file_with_python_starts_nothing(write_app: WriteApp) -> None:
    """`python APPFILE` only builds the tree: it exits at once, silently, with status 0."""
    path = write_app(GOOD)

    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=30)

    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_missing_file_is_an_app_file_error(tmp_path: Path) -> None:
    """A file that does not exist is a one-line AppFileError naming it and the reason."""
    path = tmp_path / "missing.py"

    with pytest.raises(AppFileError) as caught:
        load_application(str(path))

    message = assert_one_line_naming(caught.value, path)
    assert message == f"cannot read app file {str(path)!r}: No such file or directory"


def test_folder_instead_of_a_file_is_an_app_file_error(tmp_path: Path) -> None:
    """A folder given as the app file is a one-line AppFileError naming it."""
    with pytest.raises(AppFileError) as caught:
        load_application(str(tmp_path))

    message = assert_one_line_naming(caught.value, tmp_path)
    assert message.endswith(": it is a directory, not a regular file")


def test_syntax_error_names_the_file_and_line(write_app: WriteApp) -> None:
    """A file that does not compile is a one-line AppFileError with the file and line."""
    path = write_app(
        """
        import tend

        application = tend.Application("poetry"
        tend.Service("x")
        """
    )

    with pytest.raises(AppFileError) as caught:
        load_application(str(path))

    message = assert_one_line_naming(caught.value, path)
    assert message.startswith(f"{path}: syntax error at line ")
    line = int(message.split("syntax error at line ")[1].split(":")[0])
    assert line in (4, 5)


def test_null_bytes_are_an_app_file_error(write_app: WriteApp, tmp_path: Path) -> None:
    """A file holding NUL bytes is a one-line AppFileError, not a crash."""
    path = tmp_path / "binary.py"
    path.write_bytes(b"application = 1\x00\n")

    with pytest.raises(AppFileError) as caught:
        load_application(str(path))

    assert_one_line_naming(caught.value, path)


def test_exception_while_running_names_it_and_logs_the_traceback(
    write_app: WriteApp, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception raised by the file names the exception; its traceback goes to the log."""
    path = write_app(
        """
        import tend

        def read_poem():
            raise FileNotFoundError("poems/missing.txt")

        application = tend.Application("poetry")
        read_poem()
        """
    )

    with pytest.raises(AppFileError) as caught:
        load_application(str(path))

    message = assert_one_line_naming(caught.value, path)
    assert message == (
        f"{path}: FileNotFoundError: poems/missing.txt (the traceback is in the log)"
    )
    (record,) = [r for r in caplog.records if r.name == "tend"]
    assert record.levelno == logging.ERROR
    assert str(path) in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[0] is FileNotFoundError
    assert "read_poem" in caplog.text


def test_exception_with_a_multiline_message_is_reported_on_one_line(
    write_app: WriteApp,
) -> None:
    """An exception whose message spans lines still gives a one-line AppFileError."""
    path = write_app("raise ValueError('first line\\nsecond line')\n")

    with pytest.raises(AppFileError) as caught:
        load_application(str(path))

    message = assert_one_line_naming(caught.value, path)
    assert "ValueError: first line" in message


def test_missing_application_is_an_app_file_error(write_app: WriteApp) -> None:
    """A file that defines no `application` says so and shows how to define one."""
    path = write_app(
        """
        import tend

        app = tend.Application("poetry")
        """
    )

    with pytest.raises(AppFileError) as caught:
        load_application(str(path))

    message = assert_one_line_naming(caught.value, path)
    assert message == (
        f"{path}: no variable named 'application'; define application = tend.Application(\"name\")"
    )


def test_application_of_the_wrong_type_is_an_app_file_error(write_app: WriteApp) -> None:
    """An `application` that is not a tend.Application names the type it is."""
    path = write_app(
        """
        import tend

        application = tend.MultiService("poetry")
        """
    )

    with pytest.raises(AppFileError) as caught:
        load_application(str(path))

    message = assert_one_line_naming(caught.value, path)
    assert message.startswith(f"{path}: 'application' is a MultiService, not a tend.Application; ")


def test_app_file_error_is_a_startup_error() -> None:
    """AppFileError is a StartupError, so a bad app file is a failed start (exit 1)."""
    assert issubclass(AppFileError, StartupError)


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ("import sys\nsys.exit(0)\n", "called sys.exit(0) while being loaded"),
        ("import sys\nsys.exit(3)\n", "called sys.exit(3) while being loaded"),
        ("import sys\nsys.exit('a\\nb')\n", "called sys.exit('a\\nb') while being loaded"),
        ("import os\nos._exit(0)\n", "called os._exit(0) while being loaded"),
        ("raise BaseException('odd')\n", "BaseException: odd (the traceback is in the log)"),
        (
            "class Odd(Exception):\n    def __str__(self):\n        raise RuntimeError\n"
            "raise Odd()\n",
            "Odd: (its message cannot be shown) (the traceback is in the log)",
        ),
        (
            "import tend\napplication = tend.Application('dup')\n"
            "tend.Service('same').set_service_parent(application)\n"
            "tend.Service('same').set_service_parent(application)\n",
            "cannot add <Service 'same'> to <Application 'dup'>: a service named 'same' is "
            "already there",
        ),
    ],
)
def test_an_app_file_that_exits_or_raises_is_one_line_naming_it(
    tmp_path: Path, body: str, line: str
) -> None:
    """Whatever an app file does at import, tend says so in one line naming the file, exit 1."""
    app = tmp_path / "app.py"
    app.write_text(body)
    result = subprocess.run(
        [*TEND, "--nodaemon", "--pidfile=", "-y", str(app)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"tend: {app}: {line}")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_sys_exit_in_start_service_is_one_line(tmp_path: Path) -> None:
    """A service that calls sys.exit while starting fails the start with one line, exit 1."""
    app = tmp_path / "app.py"
    app.write_text(
        "import sys, tend\n"
        "class Quitter(tend.Service):\n"
        "    async def start_service(self):\n"
        "        sys.exit(3)\n"
        "application = tend.Application('quit')\n"
        "Quitter('quitter').set_service_parent(application)\n"
    )
    result = subprocess.run(
        [*TEND, "--nodaemon", "--pidfile=", "-y", str(app)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == "tend: a service called sys.exit(3) while starting\n"
