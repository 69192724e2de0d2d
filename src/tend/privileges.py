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
        raise PrivilegeError(f"cannot switch to {kind} {quote(text)}: no such {kind}") from None


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
