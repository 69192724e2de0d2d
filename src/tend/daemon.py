"""Becoming a daemon: detaching, the pidfile, privileges, umask, rundir and chroot.

This is the only module that calls fork, setsid, setuid, setgid, umask or chroot. It
knows nothing of services or event loops; the runner decides when each step happens.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import os
import pwd
from dataclasses import dataclass

from tend.errors import StartupError

log = logging.getLogger("tend")


class PidfileError(StartupError):
    """A pidfile that cannot be used."""


class PidfileLockedError(PidfileError):
    """Another live tend server holds the pidfile."""


class PrivilegeError(StartupError):
    """A user or group that does not exist, or a drop that is not allowed."""


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

    def acquire(self, pid: int | None = None) -> None:
        """Lock the pidfile and write *pid* (default: this process) into it.

        Raises:
            PidfileLockedError: a live server holds it.
            PidfileError: it is a directory, holds something other than a pid, or cannot
                be written.
        """
        pid = os.getpid() if pid is None else pid
        guard = self._open_locked_existing()
        try:
            self._write(pid)
        except BaseException:
            self._close_fds()
            raise
        if guard is not None:
            # Holding the old file's lock until exit keeps a racing starter that opened
            # it before the rename from believing it stale.
            self._fds.append(guard)

    def _open_locked_existing(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise PidfileError(f"cannot open pidfile {self.path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            content = _read_fd(fd)
            os.close(fd)
            shown = content.strip() if content.strip() else "unknown"
            raise PidfileLockedError(
                f"Another tend server is running, PID {shown} (pidfile {self.path})"
            ) from None
        content = _read_fd(fd).strip()
        if content and not content.isdigit():
            os.close(fd)
            raise PidfileError(
                f"pidfile {self.path} holds {content[:40]!r}, not a process id; "
                "remove it if no server uses it"
            )
        log.info("Removing stale pidfile %s", self.path)
        return fd

    def _write(self, pid: int) -> None:
        folder, name = os.path.split(self.path)
        temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise PidfileError(f"cannot write pidfile {self.path}: {error.strerror}") from None
        self._fds.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{pid}\n".encode())
            os.fchmod(fd, 0o644)  # readable by tendctl and `kill $(cat ...)` whatever the umask
            os.rename(temporary, self.path)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise PidfileError(f"cannot write pidfile {self.path}: {error.strerror}") from None
        stat = os.fstat(fd)
        self._inode = (stat.st_dev, stat.st_ino)
        self._folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fds.append(self._folder_fd)

    def release(self) -> None:
        """Remove the pidfile if it is still ours, and drop the lock."""
        if self._inode is not None and self._folder_fd is not None:
            name = os.path.basename(self.path)
            with contextlib.suppress(OSError):
                stat = os.stat(name, dir_fd=self._folder_fd)
                if (stat.st_dev, stat.st_ino) == self._inode:
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


def read_pidfile(path: str) -> PidfileState | None:
    """Read the pidfile at *path* without disturbing its owner; None if there is none.

    Raises:
        PidfileError: it cannot be read, or holds something other than a pid.
    """
    path = os.path.abspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise PidfileError(f"cannot read pidfile {path}: {error.strerror}") from None
    try:
        try:
            content = _read_fd(fd).strip()
        except OSError as error:
            raise PidfileError(f"cannot read pidfile {path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            locked = False
        except BlockingIOError:
            locked = True
    finally:
        os.close(fd)
    if content and not content.isdigit():
        raise PidfileError(f"pidfile {path} holds {content[:40]!r}, not a process id")
    return PidfileState(path, int(content) if content else None, locked)


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 64).decode(errors="replace")


# -- Detaching ---------------------------------------------------------------------------


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
        os._exit(0)
    return None


def redirect_standard_streams() -> None:
    """Point standard input, output and error at /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    if null > 2:
        os.close(null)


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


# -- Privileges --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """The user and group to run as, resolved to numbers."""

    uid: int | None
    gid: int | None
    user_name: str | None

    def __str__(self) -> str:
        user = self.user_name or (str(self.uid) if self.uid is not None else "")
        group = ""
        if self.gid is not None:
            try:
                group = grp.getgrgid(self.gid).gr_name
            except KeyError:
                group = str(self.gid)
        return f"{user}:{group}" if user and group else user or f":{group}"

    @property
    def changes_anything(self) -> bool:
        return (self.uid is not None and self.uid != os.geteuid()) or (
            self.gid is not None and self.gid != os.getegid()
        )


def resolve_identity(user: int | str | None, group: int | str | None) -> Identity:
    """Turn user and group names or numbers into numbers.

    Without a group, the user's primary group is used, as login would.

    Raises:
        PrivilegeError: the user or group does not exist.
    """
    uid = gid = None
    user_name = None
    if user is not None:
        entry = _lookup(user, pwd.getpwnam, pwd.getpwuid, "user")
        if entry is not None:
            uid, user_name, gid = entry.pw_uid, entry.pw_name, entry.pw_gid
        else:
            uid = int(user)
    if group is not None:
        group_entry = _lookup(group, grp.getgrnam, grp.getgrgid, "group")
        gid = group_entry.gr_gid if group_entry is not None else int(group)
    return Identity(uid, gid, user_name)


def _lookup(value: int | str, by_name, by_number, kind: str):  # type: ignore[no-untyped-def]
    text = str(value)
    if text.isdigit():
        try:
            return by_number(int(text))
        except KeyError:
            return None  # a bare number with no entry is still a valid id to run as
    try:
        return by_name(text)
    except KeyError:
        raise PrivilegeError(f"cannot switch to {kind} {text!r}: no such {kind}") from None


def check_can_switch(identity: Identity) -> None:
    """Refuse a switch that only root can make, before anything else has started.

    Raises:
        PrivilegeError: not running as root.
    """
    if identity.changes_anything and os.geteuid() != 0:
        raise PrivilegeError(
            "cannot switch user or group: only root can; run tend as root or drop --uid/--gid"
        )


def drop_privileges(identity: Identity) -> None:
    """Become *identity*'s user and group for good, with its supplementary groups."""
    if not identity.changes_anything:
        return
    if identity.gid is not None:
        if identity.user_name is not None:
            os.initgroups(identity.user_name, identity.gid)
        else:
            os.setgroups([identity.gid])
        os.setresgid(identity.gid, identity.gid, identity.gid)
    if identity.uid is not None:
        os.setresuid(identity.uid, identity.uid, identity.uid)


# Modules imported on first use after the process may have lost sight of the interpreter's
# files (a chroot, or a user who cannot read them): the event loop's thread pool (for
# getaddrinfo and to_thread), the IDNA codec getaddrinfo needs, and ctypes for prctl.
LATE_IMPORTS = ("concurrent.futures.thread", "encodings.idna", "ctypes")


def preload_modules() -> None:
    """Import now what a chroot or a drop of privileges could make unreadable later."""
    import importlib

    for name in LATE_IMPORTS:
        importlib.import_module(name)


def die_with_parent(signal_number: int, parent: int) -> None:
    """Ask the kernel to send *signal_number* when the parent process dies (Linux only).

    A worker whose supervisor was killed outright must not serve on, orphaned and
    unsupervised. Call it after dropping privileges: a change of credentials clears it.
    """
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal_number, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal_number)
