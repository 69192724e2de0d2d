"""Reading the files a user names: regular files only, never waiting on one, size capped.

A FIFO given as a poem or an app file would make a naive ``open`` wait for ever, and
``/dev/zero`` would be read until memory runs out. `read_file` opens without blocking,
refuses anything but a regular file, and refuses a file past its size cap, each with one
line naming what was being read. `working_directory` is where relative names start from.
Makes no OS calls but reading the file and looking at the current directory.
"""

from __future__ import annotations

import os
import stat

from tend.errors import StartupError, quote

# The caps tend applies to the files it reads (the README's "When something is wrong").
APP_FILE_LIMIT = 10 * 1024 * 1024
DEPLOYMENT_FILE_LIMIT = 1024 * 1024
TLS_FILE_LIMIT = 1024 * 1024
PIDFILE_LIMIT = 64


def working_directory() -> str:
    """The current directory, as the user's shell names it.

    ``$PWD`` when it is that directory (a ``current`` symlink to a release, as deployment
    tools make), else the resolved path: an upgrade or a reload then follows the symlink
    to the new release, rather than going back to the one tend was started in.
    """
    resolved = os.getcwd()
    named = os.environ.get("PWD", "")
    if os.path.isabs(named) and named != resolved:
        try:
            if os.path.samestat(os.stat(named), os.stat(resolved)):
                return os.path.normpath(named)
        except OSError:
            pass
    return resolved


def describe_kind(mode: int) -> str:
    """What a non-regular file is, for a message: ``a directory``, ``a FIFO``, ..."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def read_file(
    path: str, what: str, limit: int, *, hint: str = "", name: str | None = None
) -> bytes:
    """The bytes of the regular file at *path*, at most *limit* of them.

    *what* names the file in messages (``poem file``, ``app file``); *hint* follows a
    size complaint (``; raise it with --max-poem-bytes``); *name* is how messages show
    *path*, if not as it is (``deploy.toml`` for an absolute path below here).

    Raises:
        StartupError: the file cannot be opened or read, is not a regular file, or is
            larger than *limit* bytes.
    """
    shown = quote(path if name is None else name)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; a regular file ignores it.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as error:
        raise StartupError(f"cannot read {what} {shown}: {error.strerror}") from None
    except (ValueError, UnicodeError) as error:  # a NUL byte in the path
        raise StartupError(f"cannot read {what} {shown}: {error}") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise StartupError(
                f"cannot read {what} {shown}: it is {describe_kind(status.st_mode)}, "
                "not a regular file"
            )
        too_big = (
            f"cannot read {what} {shown}: it is larger than the limit of {limit:,} bytes{hint}"
        )
        if status.st_size > limit:
            raise StartupError(too_big)
        chunks = []
        size = 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise StartupError(too_big)
        return b"".join(chunks)
    except OSError as error:
        raise StartupError(f"cannot read {what} {shown}: {error.strerror}") from None
    finally:
        os.close(fd)
