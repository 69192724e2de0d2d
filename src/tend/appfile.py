"""App files: Python files that define ``application`` (twistd: tac files).

Running an app file only builds a service tree; nothing starts until tend runs it,
which is why ``python app.py`` does nothing at all.
"""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType

from tend.errors import StartupError, TendError, quote
from tend.service import Application

log = logging.getLogger("tend")


class AppFileError(StartupError):
    """An app file that cannot be read, compiled, run, or has no application."""


def load_application(path: str) -> Application:
    """Run the app file at *path* and return the Application it defines.

    A traceback from the file's own code goes to the log; the error raised carries the
    one line the user reads.
    """
    try:
        with open(path, "rb") as file:
            source = file.read()
    except OSError as error:
        raise AppFileError(f"cannot read app file {quote(path)}: {error.strerror}") from None
    try:
        code = compile(source, path, "exec")
    except SyntaxError as error:
        raise AppFileError(f"{path}: syntax error at line {error.lineno}: {error.msg}") from None
    except ValueError as error:  # source with NUL bytes
        raise AppFileError(f"{path}: cannot compile: {error}") from None
    module = ModuleType("__tend_app__")
    module.__file__ = os.path.abspath(path)
    # As `python FILE` would, let the file import its neighbours.
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        exec(code, module.__dict__)
    except TendError as error:
        # tend's own complaint (a duplicate service name, say), about this file's code.
        raise AppFileError(f"{path}: {error}") from None
    except Exception as error:
        log.exception("error while running app file %s", path)
        raise AppFileError(
            f"{path}: {type(error).__name__}: {' '.join(str(error).split())} "
            "(the traceback is in the log)"
        ) from None
    if "application" not in module.__dict__:
        raise AppFileError(
            f"{path}: no variable named 'application'; "
            'define application = tend.Application("name")'
        )
    application = module.__dict__["application"]
    if not isinstance(application, Application):
        raise AppFileError(
            f"{path}: 'application' is a {type(application).__name__}, not a tend.Application; "
            'define application = tend.Application("name")'
        )
    return application
