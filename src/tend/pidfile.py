"""The pidfile: written whole, kept locked while tend runs, removed only if still ours.

Only the supervisor holds one; tendctl reads them. Knows nothing of services or signals.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from dataclasses import dataclass

from tend.errors import StartupError, quote
from tend.files import PIDFILE_LIMIT, describe_kind

log = logging.getLogger("tend")

# How often a start looks again when another one creates the pidfile first.
CREATE_ATTEMPTS = 5


class PidfileError(StartupError):
    """A pidfile that cannot be used."""


class PidfileLockedError(PidfileError):
    """Another live tend server holds the pidfile."""


@dataclass(frozen=True, slots=True)
class PidfileState:
    """What a pidfile says: the pid in it, and whether a live process holds its lock."""

    path: str
    pid: int | None
    locked: bool


class Pidfile:
    """A pidfile kept locked for as long as the server runs.

    The lock, not ``kill(pid, 0)``, tells a live server from a stale file, so a process
    that reuses a dead server's pid (common in containers, where pids restart at 1)
    never blocks a restart. The file is written whole (a new file renamed into place),
    so a reader never sees it half written.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._fds: list[int] = []
        self._inode: tuple[int, int] | None = None
        # The pidfile's folder, held open: after a chroot its path no longer leads there.
        self._folder_fd: int | None = None

    def __repr__(self) -> str:
        return f"<Pidfile {self.path!r}>"

    def acquire(self, pid: int | None = None, *, take_over: bool = False) -> None:
        """Lock the pidfile and write *pid* (default: this process) into it.

        With *take_over* (an upgrade), a pidfile locked by the tend this one succeeds is
        replaced: the new file, locked first, is renamed over it, so the path always
        names a locked file of a live tend.

        Raises:
            PidfileLockedError: a live server holds it.
            PidfileError: it is a directory, holds something other than a pid, or cannot
                be written.
        """
        pid = os.getpid() if pid is None else pid
        for _ in range(CREATE_ATTEMPTS):
            guard = None if take_over else self._open_locked_existing()
            if take_over:
                fd = _open_pidfile(self.path, os.O_RDONLY)  # checked: a regular file, or none
                if fd is not None:
                    os.close(fd)
            try:
                # With no file there, the new one is linked in, not renamed: of two starts
                # that both found none, only one can create it.
                self._write(pid, create=guard is None and not take_over)
            except _Raced:
                self._close_fds()
                continue
            except BaseException:
                self._close_fds()
                if guard is not None:
                    os.close(guard)
                raise
            if guard is not None:
                # Holding the old file's lock until exit keeps a racing starter that opened
                # it before the rename from believing it stale.
                self._fds.append(guard)
            return
        raise PidfileError(f"cannot write pidfile {quote(self.path)}: other starts keep racing")

    def _open_locked_existing(self) -> int | None:
        fd = _open_pidfile(self.path, os.O_RDWR)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_or_none(_read_fd(fd))
            os.close(fd)
            raise PidfileLockedError(
                f"Another tend server is running, PID {pid or 'unknown'} (pidfile {self.path})"
            ) from None
        try:
            _parse_pid(_read_fd(fd), self.path)
        except PidfileError:
            os.close(fd)
            raise
        log.info("Removing stale pidfile %s", self.path)
        return fd

    def _write(self, pid: int, *, create: bool = False) -> None:
        folder, name = os.path.split(self.path)
        temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise PidfileError(
                f"cannot write pidfile {quote(self.path)}: {error.strerror}"
            ) from None
        self._fds.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{pid}\n".encode())
            os.fchmod(fd, 0o644)  # readable by tendctl and `kill $(cat ...)` whatever the umask
            if not create or not _linked(temporary, self.path):
                os.rename(temporary, self.path)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise PidfileError(
                f"cannot write pidfile {quote(self.path)}: {error.strerror}"
            ) from None
        status = os.fstat(fd)
        self._inode = (status.st_dev, status.st_ino)
        self._folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fds.append(self._folder_fd)

    def release(self) -> None:
        """Remove the pidfile if it is still ours, and drop the lock."""
        if self._inode is not None and self._folder_fd is not None:
            name = os.path.basename(self.path)
            with contextlib.suppress(OSError):
                status = os.stat(name, dir_fd=self._folder_fd, follow_symlinks=False)
                if (status.st_dev, status.st_ino) == self._inode:
                    os.unlink(name, dir_fd=self._folder_fd)
            self._inode = None
        self._close_fds()

    def forget(self) -> None:
        """In a forked child: close this copy of the lock without removing the file.

        The lock belongs to the open file, which the parent still holds.
        """
        self._inode = self._folder_fd = None
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._folder_fd = None


class _Raced(Exception):
    """Another start created the pidfile between our look and our write."""


def _linked(temporary: str, path: str) -> bool:
    """Give *temporary* the name *path* only if nothing has it; True if done that way.

    False where the file system has no hard links (the caller renames instead).

    Raises:
        _Raced: something has the name now (*temporary* is removed).
    """
    try:
        os.link(temporary, path)
    except FileExistsError:
        os.unlink(temporary)
        raise _Raced from None
    except OSError as error:
        if error.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            return False
        raise
    os.unlink(temporary)
    return True


def read_pidfile(path: str) -> PidfileState | None:
    """Read the pidfile at *path* without disturbing its owner; None if there is none.

    Raises:
        PidfileError: it cannot be read, is not a regular file, or holds something other
            than a pid.
    """
    path = os.path.abspath(path)
    fd = _open_pidfile(path, os.O_RDONLY)
    if fd is None:
        return None
    try:
        try:
            content = _read_fd(fd)
        except OSError as error:
            raise PidfileError(f"cannot read pidfile {quote(path)}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            locked = False
        except BlockingIOError:
            locked = True
    finally:
        os.close(fd)
    return PidfileState(path, _parse_pid(content, path), locked)


def _open_pidfile(path: str, mode: int) -> int | None:
    """Open an existing pidfile: never through a symbolic link, never waiting on a FIFO.

    Returns None if there is none.

    Raises:
        PidfileError: it cannot be opened, or it is not a regular file (a device, say,
            which tend must neither read nor replace).
    """
    flags = mode | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise PidfileError(
                f"cannot use pidfile {quote(path)}: it is a symbolic link; give the real path"
            ) from None
        raise PidfileError(f"cannot open pidfile {quote(path)}: {error.strerror}") from None
    except ValueError as error:  # a NUL byte in the path
        raise PidfileError(f"cannot open pidfile {quote(path)}: {error}") from None
    mode_bits = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode_bits):
        os.close(fd)
        raise PidfileError(
            f"cannot use pidfile {quote(path)}: it is {describe_kind(mode_bits)}, "
            "not a regular file"
        )
    return fd


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, PIDFILE_LIMIT).decode("ascii", errors="replace")


def _pid_or_none(content: str) -> int | None:
    text = content.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) < 20 else None


def _parse_pid(content: str, path: str) -> int | None:
    """The pid a pidfile holds; None if it is empty.

    Raises:
        PidfileError: it holds anything else; what it holds is not repeated, since a
            path that is not a pidfile may hold a secret.
    """
    if not content.strip():
        return None
    pid = _pid_or_none(content)
    if pid is None:
        raise PidfileError(
            f"pidfile {quote(path)} holds something other than a process id; "
            "remove it if no server uses it"
        )
    return pid
