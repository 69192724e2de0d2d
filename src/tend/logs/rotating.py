"""The log file: appended to, rotated as twistd's LogFile, reopened, relayed from workers.

Owns `LogFileHandler`: writing through the file's folder descriptor (so rotation and
SIGUSR1 reopening work after a chroot), rotation at record boundaries, and the relay by
which a forked worker sends its formatted lines to the supervisor, the one process that
writes the file. Stays out of when lines are written (`tend.logs.buffered`) and what they
look like (`tend.logs.formats`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator

from tend.errors import quote
from tend.files import describe_kind
from tend.logs.buffered import BufferedHandler
from tend.logs.handler import LogError, complain

__all__ = ["LogFileHandler"]


class LogFileHandler(BufferedHandler):
    """Appends to a file, rotating it as twistd's LogFile does.

    Before a write that would take the file past *max_bytes*, the file becomes ``PATH.1``
    (``PATH.1`` becomes ``PATH.2``, and so on) and a fresh one starts. A line is never split
    across files, nor a record unless it alone exceeds *max_bytes*; a line that alone exceeds
    it fills a fresh file by itself.

    The file's folder is held open and every open, rename and listing goes through it,
    so rotation and SIGUSR1 reopening keep working after a chroot, where the path given
    at start no longer leads there.

    The supervisor writes this file as root while the workers run as another user, who
    may be able to write the folder. So the file is never opened through a symbolic link,
    must be a regular file, and in a folder that another user can write, an existing file
    is used only if this process's user owns it and it has no other name (a hard link to
    /etc/shadow is root's too). A write that fails (a full disk) leaves no part of a line
    behind; the lines lost are counted and reported once the log can be written again.
    """

    def __init__(self, path: str, max_bytes: int, backups: int | None) -> None:
        self.path = path
        # Not self._name: logging.Handler keeps its own name there.
        folder, self._file_name = os.path.split(os.path.abspath(path))
        try:
            self._folder = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise LogError(f"cannot open log file {quote(path)}: {error.strerror}") from error
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd: int | None = None
        self._size = 0
        self._rotates = False
        self._relaying = False  # writing to a pipe to the supervisor, see relay_to
        self._left = False  # another process owns the file now: no rotating, no reopening
        self._lost = 0  # lines not written since writes began to fail
        self._rotation_failing = False  # said so once; said again after a rotation works
        self._failure = ""  # why they failed
        try:
            opened = self._open_or_raise()
        except LogError:
            os.close(self._folder)
            raise
        try:
            if self.max_bytes > 0:
                self._check_backups()
        except LogError:
            os.close(opened[0])
            os.close(self._folder)
            raise
        # Only now: Handler.__init__ registers the handler for logging.shutdown().
        super().__init__()
        self._adopt(*opened)

    def fileno(self) -> int | None:
        return self._fd

    def describe(self) -> str:
        return f"log file {quote(self.path)}"

    def _open(self) -> tuple[int, os.stat_result]:
        """Open the file to append to, creating it if need be; see the class docstring.

        Raises:
            OSError: it cannot be opened.
            LogError: it is not a file this process may safely write.
        """
        # The mode is left to the umask in force, as the user chose it (--umask).
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
        try:
            fd = os.open(
                self._file_name, flags | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=self._folder
            )
            created = True
        except FileExistsError:
            # Looked at first, so a FIFO or device is named as what it is; the open that
            # follows checks again (O_NOFOLLOW, fstat), and O_NONBLOCK keeps a FIFO put there
            # in between from making it wait.
            found = os.stat(self._file_name, dir_fd=self._folder, follow_symlinks=False)
            if stat.S_ISLNK(found.st_mode):
                raise self._unsafe("it is a symbolic link; give the real path") from None
            if not stat.S_ISREG(found.st_mode):
                raise self._unsafe(_not_regular(found.st_mode)) from None
            fd = os.open(self._file_name, flags | os.O_NONBLOCK, dir_fd=self._folder)
            created = False
        except OSError as error:
            if error.errno == errno.ELOOP:  # a symbolic link, which O_EXCL also refuses
                raise self._unsafe("it is a symbolic link; give the real path") from None
            raise
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise self._unsafe(_not_regular(status.st_mode))
            foreign = status.st_uid != os.geteuid() or status.st_nlink != 1
            if not created and foreign and self._folder_is_shared():
                raise self._unsafe(
                    f"its folder can be written by others, and the file is owned by "
                    f"uid {status.st_uid} or has other names; move it away"
                )
            return fd, status
        except BaseException:
            os.close(fd)
            raise

    def _unsafe(self, reason: str) -> LogError:
        return LogError(f"cannot use log file {quote(self.path)}: {reason}")

    def _folder_is_shared(self) -> bool:
        """Whether a user other than this process's can put files in the log's folder."""
        folder = os.fstat(self._folder)
        return folder.st_uid != os.geteuid() or bool(folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH))

    def _open_or_raise(self) -> tuple[int, os.stat_result]:
        try:
            return self._open()
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise self._unsafe("it is a symbolic link; give the real path") from None
            raise LogError(f"cannot open log file {quote(self.path)}: {error.strerror}") from error

    def _adopt(self, fd: int, status: os.stat_result) -> None:
        """Make *fd* the file written to, closing the previous one."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._size = status.st_size
        # Renaming /dev/stdout or a FIFO would be wrong: only regular files rotate.
        self._rotates = self.max_bytes > 0 and stat.S_ISREG(status.st_mode)

    def reopen(self) -> None:
        """Write out the buffer, then reopen the path (logrotate moved the file; SIGUSR1).

        Raises:
            LogError: the path cannot be opened; the old file stays in use.
        """
        self.acquire()
        try:
            if self._closed or self._relaying or self._left:
                return
            self._write_buffer()
            self._adopt(*self._open_or_raise())
        finally:
            self.release()

    def leave_the_file(self) -> None:
        self.acquire()
        try:
            self._rotates = False
            self._left = True
        finally:
            self.release()

    def relay_to(self, fd: int) -> None:
        """In a forked worker: write to *fd*, a pipe, and leave the file to the supervisor.

        Records go through the pipe framed by `frame_records`, so that the supervisor
        rotates between records, never inside one (a traceback stays in one file).

        Lines buffered before the fork are the supervisor's to write, so they are dropped
        here rather than written twice.
        """
        self.acquire()
        try:
            self._buffer, self._buffered_chars = [], 0
            self._scheduled_on = None
            self._rotates = False
            self._relaying = True
            if self._fd is not None:
                os.close(self._fd)
            self._fd = fd
            # The folder is the supervisor's: in a worker under --chroot it would be a way
            # out of the jail, to a user who may not even be allowed to find it.
            if self._folder >= 0:
                os.close(self._folder)
                self._folder = -1
        finally:
            self.release()

    def _close_destination(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._folder >= 0:
            os.close(self._folder)
            self._folder = -1

    def _write_lines(self, lines: list[str]) -> None:
        try:
            self._write_or_raise(lines)
        except OSError as error:
            self._count_lost(len(lines), error)
            return
        if self._lost:
            lost, self._lost = self._lost, 0
            notice = (
                f"{time.strftime('%Y-%m-%d %H:%M:%S%z')} [-] {lost} log line(s) were lost "
                f"while the log could not be written ({self._failure})\n"
            )
            with contextlib.suppress(OSError):
                self._write(notice.encode())
            complain(f"tend: writing to {self.describe()} again; {lost} line(s) were lost")

    def _count_lost(self, count: int, error: OSError) -> None:
        if not self._lost:
            self._failure = error.strerror or str(error)
            complain(
                f"tend: cannot write to {self.describe()}: {self._failure}; counting the lines lost"
            )
        self._lost += count

    def _write_or_raise(self, lines: list[str]) -> None:
        if self._relaying:
            self._write(frame_records(lines))
            return
        data = "".join(lines).encode("utf-8", "backslashreplace")
        if not self._rotates or self._size + len(data) <= self.max_bytes:
            self._write(data)
            return
        # About to cross the limit: trust the file over our count, which is stale if
        # logrotate's copytruncate emptied the file.
        assert self._fd is not None  # _rotates is only set with a file open
        self._size = os.fstat(self._fd).st_size
        if self._size + len(data) <= self.max_bytes:
            self._write(data)
            return
        self._write_rotating(lines)

    def _write_rotating(self, lines: list[str]) -> None:
        """Write *lines* in as many files as the limit needs, rotating at record boundaries."""
        chunk: list[bytes] = []
        chunk_size = 0
        rotates = True
        for unit in self._units(lines):
            filled = self._size + chunk_size
            if rotates and filled > 0 and filled + len(unit) > self.max_bytes:
                if chunk:
                    self._write(b"".join(chunk))
                    chunk, chunk_size = [], 0
                try:
                    self._rotate()
                except (OSError, LogError) as error:
                    # Report it, and keep writing to the current file: a line is worth more
                    # than the limit. The next write that crosses the limit tries again.
                    rotates = False
                    if not self._rotation_failing:
                        self._rotation_failing = True
                        complain(
                            f"tend: {error}"
                            if isinstance(error, LogError)
                            else f"tend: cannot rotate {self.describe()}: {_reason(error)}"
                        )
            chunk.append(unit)
            chunk_size += len(unit)
        if chunk:
            self._write(b"".join(chunk))

    def _units(self, lines: list[str]) -> Iterator[bytes]:
        """The pieces rotation may not split: records, or the lines of an oversized record."""
        for line in lines:
            data = line.encode("utf-8", "backslashreplace")
            if len(data) > self.max_bytes and data.count(b"\n") > 1:
                for part in data[:-1].split(b"\n"):
                    yield part + b"\n"
            else:
                yield data

    def _write(self, data: bytes) -> None:
        """Write *data* whole, or leave the file as it was and raise."""
        assert self._fd is not None  # only called between open and close
        view = memoryview(data)
        written = 0
        try:
            while view:
                count = os.write(self._fd, view)
                if count == 0:  # not expected of a file; do not spin forever
                    raise OSError(errno.EIO, "nothing was written")
                written += count
                view = view[count:]
        except OSError:
            if written and not self._relaying:
                # A line cut by a full disk would be glued to the next one written: take
                # back what this write put in the file, which only this process writes.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise
        self._size += written

    def _check_backups(self) -> None:
        """Refuse to rotate over anything but files: PATH.1 a folder would be renamed.

        Raises:
            LogError: a backup's name is taken by something else.
        """
        for number in self._backup_numbers():
            backup = f"{self._file_name}.{number}"
            found = os.stat(backup, dir_fd=self._folder, follow_symlinks=False)
            if not stat.S_ISREG(found.st_mode):
                raise LogError(
                    f"cannot rotate log file {quote(self.path)}: {quote(backup)} is "
                    f"{describe_kind(found.st_mode)}, not a rotated log; move it away"
                )

    def _rotate(self) -> None:
        """Start a fresh file, keeping the old one as PATH.1 (twistd: LogFile.rotate).

        Older backups move up one number, and those past *backups* are deleted.
        """
        self._check_backups()
        folder, name = self._folder, self._file_name
        for number in sorted(self._backup_numbers(), reverse=True):
            older = f"{name}.{number}"
            if self.backups is not None and number >= self.backups:
                os.unlink(older, dir_fd=folder)
            else:
                os.rename(older, f"{name}.{number + 1}", src_dir_fd=folder, dst_dir_fd=folder)
        if self.backups == 0:
            os.unlink(name, dir_fd=folder)
        else:
            os.rename(name, f"{name}.1", src_dir_fd=folder, dst_dir_fd=folder)
        # Should this open fail, the old descriptor, now PATH.1, keeps receiving lines.
        self._adopt(*self._open())
        self._rotation_failing = False

    def _backup_numbers(self) -> list[int]:
        prefix = self._file_name + "."
        numbers = []
        # scandir reads a duplicate of the descriptor and rewinds it when done.
        with os.scandir(self._folder) as entries:
            for entry in entries:
                suffix = entry.name[len(prefix) :]
                # Not "tend.log.1.gz" (compressed by logrotate) nor "tend.log.01".
                if (
                    entry.name.startswith(prefix)
                    and suffix.isascii()
                    and suffix.isdigit()
                    and str(int(suffix)) == suffix
                ):
                    numbers.append(int(suffix))
        return numbers


# Ends each record in the relay pipe: a record's own lines end in newlines.
RECORD_END = b"\0"


def frame_records(lines: list[str]) -> bytes:
    """Formatted records (each ending in a newline) as the relay pipe carries them."""
    return b"".join(
        line.removesuffix("\n").replace("\0", "\\x00").encode("utf-8", "backslashreplace")
        + RECORD_END
        for line in lines
    )


def _not_regular(mode: int) -> str:
    return f"it is {describe_kind(mode)}, not a regular file (for standard output, use -l -)"


def _reason(error: Exception) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)
