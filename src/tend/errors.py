"""The exceptions tend raises for a user's mistake, and how their one line is written.

Makes no OS calls.
"""

from __future__ import annotations

# A message the user reads is one line of at most this many characters.
LONGEST_LINE = 200

# A value quoted inside a message is shortened past this many characters.
LONGEST_QUOTE = 80


class TendError(Exception):
    """A problem a user can fix; its message is the one line they will read.

    *already_said* is set where the line has already reached standard error's
    destination (the log on standard output, when both streams are systemd's journal), so
    that the command does not say it twice.
    """

    already_said: bool = False


class UsageError(TendError):
    """A command-line mistake: unknown plugin, unknown option, bad value (exit 2).

    *hint* is a second line for the user, such as ``try `tend poetry --help```; *prog*
    names the command the message is about, when it is not the one run (``tend poetry``).
    """

    def __init__(self, message: str, hint: str | None = None, prog: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        self.prog = prog


class StartupError(TendError):
    """Something failed before the service tree was ready (exit 1)."""


def quote(value: object, limit: int = LONGEST_QUOTE, *, bare: bool = False) -> str:
    """*value* quoted for a one-line message: ``'x'``, control characters escaped, a long
    value shortened in the middle (``'aaaa…zz'``), undecodable bytes shown escaped.

    *bare* leaves out the quotes, for a file name that heads a message (``app.py: ...``).
    """
    text = value if isinstance(value, str) else str(value)
    # repr escapes newlines, other control characters, characters Python does not know and
    # unpaired surrogates (a path's undecodable bytes): the limit counts them as shown.
    widths = [len(repr(character)) - 2 for character in text]
    if sum(widths) > limit:
        head = _fitting(widths, limit * 2 // 3)
        tail = _fitting(widths[::-1], limit - limit * 2 // 3 - 1)
        # "…" itself is printable and stays as it is.
        text = f"{text[:head]}…{text[len(text) - tail :]}"
    quoted = repr(text)
    return quoted[1:-1] if bare else quoted


def _fitting(widths: list[int], budget: int) -> int:
    """How many of the first characters, of these shown *widths*, fit in *budget*."""
    used = 0
    for count, width in enumerate(widths):
        used += width
        if used > budget:
            return count
    return len(widths)


def describe_error(error: BaseException) -> str:
    """``ValueError: bad thing``, for a line about someone else's exception.

    Never raises: an exception whose ``__str__`` itself fails is still described.
    """
    try:
        text = " ".join(str(error).split())
    except Exception:
        text = "(its message cannot be shown)"
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def one_line(message: str, limit: int = LONGEST_LINE) -> str:
    """*message* as one printable line of at most *limit* characters.

    The last guard before the terminal: values should already be quoted with `quote`.
    """
    text = "".join(
        character if character.isprintable() else repr(character)[1:-1]
        for character in " ".join(message.splitlines())
    )
    # Undecodable bytes of a path arrive as surrogates: shown escaped, never raising.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text
