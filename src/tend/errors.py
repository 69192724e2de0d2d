"""The exceptions tend raises for a user's mistake. Makes no OS calls."""

from __future__ import annotations


class TendError(Exception):
    """A problem a user can fix; its message is the one line they will read."""


class UsageError(TendError):
    """A command-line mistake: unknown plugin, unknown option, bad value (exit 2)."""


class StartupError(TendError):
    """Something failed before the service tree was ready (exit 1)."""
