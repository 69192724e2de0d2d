"""App files: Python files that define ``application`` (twistd: tac files).

Running an app file only builds a service tree; nothing starts until tend runs it,
which is why ``python app.py`` does nothing at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import NoReturn

from tend.errors import StartupError, TendError, describe_error, quote
from tend.files import APP_FILE_LIMIT, read_file
from tend.service import Application

log = logging.getLogger("tend")


class AppFileError(StartupError):
    """An app file that cannot be read, compiled, run, or has no application."""


def load_application(path: str) -> Application:
    """Run the app file at *path* and return the Application it defines.

    A traceback from the file's own code goes to the log; the error raised carries the
    one line the user reads, naming the file, whatever the file did: raise, call
    ``sys.exit``, or even ``os._exit``, which would otherwise end tend without a word.
    """
    shown = quote(path, bare=True)
    try:
        source = read_file(path, "app file", APP_FILE_LIMIT)
    except StartupError as error:
        raise AppFileError(str(error)) from None
    try:
        code = compile(source, path, "exec")
    except SyntaxError as error:
        raise AppFileError(f"{shown}: syntax error at line {error.lineno}: {error.msg}") from None
    except ValueError as error:  # source with NUL bytes
        raise AppFileError(f"{shown}: cannot compile: {error}") from None
    module = ModuleType("__tend_app__")
    module.__file__ = os.path.abspath(path)
    # As `python FILE` would, let the file import its neighbours.
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        with _exits_as_errors():
            exec(code, module.__dict__)
    except TendError as error:
        # tend's own complaint (a duplicate service name, say), about this file's code.
        raise AppFileError(f"{shown}: {error}") from None
    except _Exited as exited:
        raise AppFileError(
            f"{shown}: called os._exit({exited.status}) while being loaded; "
            "an app file only defines application"
        ) from None
    except SystemExit as error:
        status = quote(error.code) if isinstance(error.code, str) else error.code
        raise AppFileError(
            f"{shown}: called sys.exit({status}) while being loaded; "
            "an app file only defines application"
        ) from None
    except BaseException as error:
        log.exception("error while running app file %s", path)
        raise AppFileError(
            f"{shown}: {describe_error(error)} (the traceback is in the log)"
        ) from None
    if "application" not in module.__dict__:
        raise AppFileError(
            f"{shown}: no variable named 'application'; "
            'define application = tend.Application("name")'
        )
    application = module.__dict__["application"]
    if not isinstance(application, Application):
        raise AppFileError(
            f"{shown}: 'application' is a {type(application).__name__}, not a tend.Application; "
            'define application = tend.Application("name")'
        )
    return application


class _Exited(BaseException):
    """The app file called os._exit(status) while being loaded."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@contextlib.contextmanager
def _exits_as_errors() -> Iterator[None]:
    """While the app file runs, its ``os._exit`` raises instead of ending tend unheard."""
    real_exit = os._exit

    def exit_while_loading(status: int) -> NoReturn:
        raise _Exited(status)

    os._exit = exit_while_loading
    try:
        yield
    finally:
        os._exit = real_exit
