"""Privileges: the user and group to run as, resolved, checked, and dropped for good.

The worker process drops them (worker.py calls `drop_privileges`); the supervisor keeps
the starting user's. This is the only module that calls setuid, setgid or initgroups.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from tend.errors import StartupError, quote


class PrivilegeError(StartupError):
    """A user or group that does not exist, or a drop that is not allowed."""


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


# The largest user or group id: 2**32 - 1 is (uid_t)-1, which setresuid() reads as
# "leave this id alone", so asking for it would silently keep root.
LARGEST_ID = 2**32 - 2


def resolve_identity(user: int | str | None, group: int | str | None) -> Identity:
    """Turn user and group names or numbers into numbers.

    Without a group, the user's primary group is used, as login would; a user given as a
    number that has no passwd entry has no primary group, so it needs an explicit group.

    Raises:
        PrivilegeError: the user or group does not exist, or is not a valid id.
    """
    uid = gid = None
    user_name = None
    if user is not None:
        uid, entry = _lookup(user, pwd.getpwnam, pwd.getpwuid, "user")
        if entry is not None:
            user_name, gid = entry.pw_name, entry.pw_gid
        elif group is None:
            raise PrivilegeError(
                f"cannot switch to user {uid}: it has no passwd entry, so no group of its "
                "own; give the group too (--gid)"
            )
    if group is not None:
        gid, _ = _lookup(group, grp.getgrnam, grp.getgrgid, "group")
        if user is None and os.geteuid() == 0:
            raise PrivilegeError(
                f"cannot switch to group {quote(str(group))} alone: tend would still run as "
                "root, which can take any group back; give the user too (--uid)"
            )
    return Identity(uid, gid, user_name)


def _lookup(value: int | str, by_name, by_number, kind: str):  # type: ignore[no-untyped-def]
    """*value*'s id and database entry (None for a number with none); names must exist."""
    text = str(value)
    if text.isascii() and text.isdigit():
        number = int(text)
        if number > LARGEST_ID:
            raise PrivilegeError(
                f"cannot switch to {kind} {quote(text)}: ids go from 0 to {LARGEST_ID}"
            )
        try:
            return number, by_number(number)
        except KeyError:
            return number, None  # a bare number with no entry is still a valid id to run as
    if not text or not text.isprintable() or text.strip() != text:
        raise PrivilegeError(f"cannot switch to {kind} {quote(text)}: not a name or a number")
    try:
        entry = by_name(text)
    except (KeyError, ValueError):  # ValueError: a NUL byte in the name
        raise PrivilegeError(f"cannot switch to {kind} {quote(text)}: no such {kind}") from None
    number = entry.pw_uid if kind == "user" else entry.gr_gid
    return number, entry


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
    """Become *identity*'s user and group for good, with its supplementary groups.

    Then check that it took: every id is the new one, and a non-root user cannot get
    root back.

    Raises:
        PrivilegeError: the kernel did not make the change (the process must not serve).
    """
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
    _check_dropped(identity)


def _check_dropped(identity: Identity) -> None:
    if identity.gid is not None and os.getresgid() != (identity.gid,) * 3:
        raise PrivilegeError(f"cannot switch to group {identity.gid}: the change did not take")
    if identity.uid is None:
        return
    if os.getresuid() != (identity.uid,) * 3:
        raise PrivilegeError(f"cannot switch to user {identity.uid}: the change did not take")
    if identity.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise PrivilegeError(f"switched to user {identity.uid}, but root could be regained")
