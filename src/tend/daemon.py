"""Becoming a daemon: detaching, standard streams, umask, rundir and chroot.

This is the only module that calls fork, setsid, umask, chroot or _exit. It knows nothing of
services or event loops; the lifecycle decides when each step happens.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
from collections.abc import Iterator
from typing import NoReturn

from tend.errors import StartupError


def fork() -> int:
    """Fork a child (a worker); 0 in the child, the child's pid in the parent."""
    gc.freeze()
    try:
        pid = os.fork()
    except BaseException:
        gc.unfreeze()
        raise
    if pid:
        gc.unfreeze()
    return pid


# Taken now: while an app file is loaded, os._exit is briefly not itself (see appfile.py).
_exit_now = os._exit


def watch_child(pid: int) -> int:
    """A pidfd for *pid*, a child just forked and not yet reaped. If none can be had (out
    of descriptors), the child is killed and reaped, as nothing could watch it, and the
    OSError is raised; the caller closes its own ends."""
    try:
        return os.pidfd_open(pid)
    except OSError:
        os.kill(pid, signal.SIGKILL)  # our child, not yet reaped: the pid is still its
        os.waitpid(pid, 0)
        raise


def exit_now(status: int) -> NoReturn:
    """End this process now, with *status*, running no exit handler and no ``finally``.

    For a forked child (its parent's exit handlers are not its own), and for a start
    abandoned from another thread.
    """
    _exit_now(status)


def detach() -> int | None:
    """Fork twice with setsid between, so the daemon has no controlling terminal.

    Returns, in the original process, the daemon's pid once the middle process has
    exited; in the daemon, None. The caller arranges how the daemon reports back.
    """
    first = os.fork()
    if first:
        os.waitpid(first, 0)
        return first
    os.setsid()
    # A session leader could acquire a terminal by opening one; its child cannot.
    if os.fork():
        _exit_now(0)
    return None


def fill_standard_streams() -> None:
    """Open /dev/null on standard input, output or error if any is closed (``<&-``).

    Otherwise the next descriptor tend opens would take its number, and redirecting the
    standard streams when detaching would put /dev/null over it.
    """
    for target in (0, 1, 2):
        try:
            os.fstat(target)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != target:
                os.dup2(null, target)
                os.close(null)


def redirect_standard_streams() -> None:
    """Point standard input, output and error at /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    if null > 2:
        os.close(null)


def set_umask(mask: int) -> None:
    """Set the file mode creation mask, before any file of tend's is created."""
    os.umask(mask)


@contextlib.contextmanager
def files_made_with_mode(mode: int | None) -> Iterator[None]:
    """Within the block, files and sockets are made with permissions *mode* exactly.

    By the umask: the process must not be making other files meanwhile (tend binds its
    sockets before any thread or worker exists).
    """
    if mode is None:
        yield
        return
    previous = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(previous)


def enter_rundir(rundir: str, chroot: str | None) -> None:
    """Chroot if asked, then change to the rundir."""
    if chroot is not None:
        try:
            os.chroot(chroot)
        except OSError as error:
            raise StartupError(f"cannot chroot to {chroot}: {error.strerror}") from None
        os.chdir("/")
    try:
        os.chdir(rundir)
    except OSError as error:
        raise StartupError(f"cannot change to rundir {rundir}: {error.strerror}") from None


# Modules imported on first use after the process may have lost sight of the interpreter's
# files (a chroot, or a user who cannot read them): the event loop's thread pool (for
# getaddrinfo and to_thread) and the IDNA codec getaddrinfo needs.
LATE_IMPORTS = ("concurrent.futures.thread", "encodings.idna")


def preload_modules() -> None:
    """Import now what a chroot or a drop of privileges could make unreadable later."""
    import importlib

    for name in LATE_IMPORTS:
        importlib.import_module(name)
