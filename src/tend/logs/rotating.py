"""The log file: appended to, rotated as twistd's LogFile, reopened, relayed from workers.

Owns `LogFileHandler`: writing through the file's folder descriptor (so rotation and
SIGUSR1 reopening work after a chroot), rotation at record boundaries, and the relay by
which a forked worker sends its formatted lines to the supervisor, the one process that
writes the file. Stays out of when lines are written (`tend.logs.buffered`) and what they
look like (`tend.logs.formats`).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator

from tend.errors import quote
from tend.logs.buffered import BufferedHandler
from tend.logs.handler import LogError

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
        try:
            opened = self._open_or_raise()
        except LogError:
            os.close(self._folder)
            raise
        # Only now: Handler.__init__ registers the handler for logging.shutdown().
        super().__init__()
        self._adopt(*opened)

    def fileno(self) -> int | None:
        return self._fd

    def _open(self) -> tuple[int, os.stat_result]:
        # The mode is left to the umask in force, as the user chose it (--umask).
        fd = os.open(
            self._file_name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666, dir_fd=self._folder
        )
        try:
            return fd, os.fstat(fd)
        except OSError:
            os.close(fd)
            raise

    def _open_or_raise(self) -> tuple[int, os.stat_result]:
        try:
            return self._open()
        except OSError as error:
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
            if self._closed or self._relaying:
                return
            self._write_buffer()
            self._adopt(*self._open_or_raise())
        finally:
            self.release()

    def relay_to(self, fd: int) -> None:
        """In a forked worker: write to *fd*, a pipe, and leave the file to the supervisor.

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
                except OSError:
                    # Report it, and keep writing to the current file: a line is worth more
                    # than the limit. The next write that crosses the limit tries again.
                    rotates = False
                    self.handleError(self._last_record or logging.makeLogRecord({}))
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
        assert self._fd is not None  # only called between open and close
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            if written == 0:  # not expected of a file; do not spin forever
                raise OSError(errno.EIO, f"cannot write to log file {quote(self.path)}")
            self._size += written
            view = view[written:]

    def _rotate(self) -> None:
        """Start a fresh file, keeping the old one as PATH.1 (twistd: LogFile.rotate).

        Older backups move up one number, and those past *backups* are deleted.
        """
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
