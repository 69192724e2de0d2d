"""Options: what a plugin or the runner accepts, and the one conversion of their values.

`Option` and `Flag` describe one option each (twistd's ``optParameters`` and ``optFlags``
rows). A value arrives either as command-line text or as a deployment file's TOML value;
`convert` turns both into what ``make_service`` or the runner receives, so the two ways in
accept exactly the same things, and `default_of` gives an option left out its default the
same way for both. `add_options` renders options with argparse. The converters at the end
(`seconds`, `positive_seconds`, `count`) are shared by tend, its plugins and its commands.
Of the system it asks only the current directory (for relative paths); it prints nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn

from tend.errors import UsageError, one_line, quote
from tend.files import working_directory


@dataclass(frozen=True, slots=True)
class Option:
    """An option that takes a value (twistd: an ``optParameters`` row).

    *type* converts the text; it raises ``ValueError`` or ``argparse.ArgumentTypeError``
    to reject it, which tend reports as a usage error naming the option. A *required*
    option has no default. A *path* option names a file or folder: a relative value is
    relative to the current directory on the command line and to the file's folder in a
    deployment file, and it arrives absolute (the daemon changes directory before services
    start); ``""`` and ``"-"`` are left as they are. *choices* limits the text to those
    words. An option with a *string_example* takes only a string in a deployment file, as
    the example shows it: a TOML number forgets how it was written (``0o27`` and ``23``
    arrive alike), which matters for a umask. A *repeatable* option may be given more
    than once, on the command line or as a deployment file's array, and arrives as a list
    of its converted values in the order given (its default, if any, as a list: a default
    may be one value or a list of them).
    """

    long: str
    short: str | None = None
    default: object = None
    help: str = ""
    type: Callable[[str], object] = str
    required: bool = False
    path: bool = False
    metavar: str | None = field(default=None, kw_only=True)
    choices: tuple[str, ...] | None = field(default=None, kw_only=True)
    string_example: str | None = field(default=None, kw_only=True)
    repeatable: bool = field(default=False, kw_only=True)

    @property
    def key(self) -> str:
        """The name the option arrives under in ``make_service``'s mapping."""
        return self.long.replace("-", "_")


@dataclass(frozen=True, slots=True)
class Flag:
    """An on/off switch, off unless given (twistd: an ``optFlags`` row)."""

    long: str
    short: str | None = None
    help: str = ""

    @property
    def key(self) -> str:
        """The name the flag arrives under in ``make_service``'s mapping."""
        return self.long.replace("-", "_")

    @property
    def default(self) -> bool:
        return False


class InvalidValue(ValueError):
    """A value its option rejects; the message says why, the caller names the option."""


def convert(option: Option | Flag, value: object, folder: str) -> object:
    """Turn *value*, command-line text or a TOML value, into what *option* delivers.

    A string goes through the option's type as the command line's text would; a TOML
    number is taken as its digits; a flag takes a boolean; a repeatable option takes one
    such value or an array of them, and gives a list. Relative paths are taken from
    *folder*.

    Raises:
        InvalidValue: the value is of the wrong kind or the option's type rejects it.
    """
    if isinstance(option, Flag):
        if not isinstance(value, bool):
            raise InvalidValue(f"expected true or false, not {describe_value(value)}")
        return value
    if not option.repeatable:
        return _convert_one(option, value, folder)
    values = value if isinstance(value, list) else [value]
    if not values:
        raise InvalidValue("expected at least one value, not an empty array")
    return [_convert_one(option, each, folder) for each in values]


def _one_of(choices: tuple[str, ...]) -> str:
    """``one of a, b, c``, shortened when the list would crowd the line out."""
    names = ", ".join(choices)
    if len(names) <= 60:
        return f"one of {names}"
    return f"one of {', '.join(choices[:4])}, … {choices[-1]} ({len(choices)} names)"


def _convert_one(option: Option, value: object, folder: str) -> object:
    if option.path and not isinstance(value, str):
        raise InvalidValue(f"expected a path, as a string, not {describe_value(value)}")
    if option.string_example is not None and not isinstance(value, str):
        raise InvalidValue(
            f"write the {option.long} as a string, as {option.long} = {option.string_example}"
        )
    text = _text(value)
    if text is None:
        raise InvalidValue(f"expected a string or a number, not {describe_value(value)}")
    if option.choices is not None and text not in option.choices:
        raise InvalidValue(f"expected {_one_of(option.choices)}, not {quote(text)}")
    if option.path and text not in ("", "-"):
        text = os.path.normpath(os.path.join(folder, os.path.expanduser(text)))
    try:
        return option.type(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        raise InvalidValue(str(error) or f"invalid value {quote(text)}") from None


def default_of(option: Option | Flag, folder: str | None = None) -> object:
    """The value an option left out takes: a default written as text goes through the type.

    Raises:
        InvalidValue: the option's own default is rejected by its type.
    """
    if isinstance(option, Flag):
        return option.default
    if option.repeatable:
        if option.default is None:
            return []
        defaults = option.default if isinstance(option.default, list | tuple) else [option.default]
        return [_default_one(option, default, folder) for default in defaults]
    return _default_one(option, option.default, folder)


def _default_one(option: Option, default: object, folder: str | None) -> object:
    if not isinstance(default, str):
        return default
    if option.path and default not in ("", "-"):
        # As a path typed on the command line: from the current directory, made absolute.
        here = working_directory() if folder is None else folder
        default = os.path.normpath(os.path.join(here, os.path.expanduser(default)))
    try:
        return option.type(default)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        raise InvalidValue(f"the default is invalid: {error}") from None


def values_of(
    options: Iterable[Option | Flag], given: Mapping[str, object], folder: str | None = None
) -> dict[str, object]:
    """Every option's value by key: the converted one *given*, else its default (a
    relative path default taken from *folder*, by default the current directory)."""
    values: dict[str, object] = {}
    for option in options:
        value = given.get(option.key)
        values[option.key] = default_of(option, folder) if value is None else value
    return values


def describe_value(value: object) -> str:
    """Name a TOML value's type as the user wrote it: ``the string 'yes'``, ``an array``."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {quote(value)}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # dates and times


def _text(value: object) -> str | None:
    """A string or number as the text a command line would carry, or None for other types."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return None


# -- argparse ---------------------------------------------------------------------------


class CommandParser(argparse.ArgumentParser):
    """An argparse parser whose mistakes are one line for the user, not a usage block.

    A bad or missing argument raises `tend.UsageError` whose message argparse wrote
    (``error: argument -p/--port: invalid endpoint 'tcp:abc'``), with the parser's name as
    *prog* and a hint naming its ``--help``; the command prints them and exits 2.
    """

    def error(self, message: str) -> NoReturn:
        # argparse quotes what was typed as it is: control characters are escaped here.
        raise UsageError(
            one_line(f"error: {message}"), hint=f"try `{self.prog} --help`", prog=self.prog
        )


def add_options(
    parser: argparse.ArgumentParser,
    options: Iterable[Option | Flag],
    *,
    negatable: bool,
    folder: str | None = None,
) -> None:
    """Add *options* to *parser*, each arriving under its key, None when not given.

    Values are converted by `convert`, so a bad one is argparse's usage error naming the
    option. With *negatable*, each flag also gets a ``--no-`` form, so a switch set by a
    deployment file can be turned off on the command line. Relative paths are taken from
    *folder*, by default the current directory.
    """
    for option in options:
        names = [f"--{option.long}"]
        if option.short:
            names.insert(0, f"-{option.short}")
        if isinstance(option, Flag):
            action: type[argparse.Action] | str = (
                argparse.BooleanOptionalAction if negatable else "store_true"
            )
            parser.add_argument(
                *names, dest=option.key, action=action, default=None, help=option.help
            )
            continue
        parser.add_argument(
            *names,
            dest=option.key,
            action="append" if option.repeatable else "store",
            metavar=option.metavar or _metavar(option),
            default=None,
            required=option.required,
            type=_argparse_type(option, folder),
            help=_help(option),
        )


def _metavar(option: Option) -> str:
    if option.choices is not None:
        return "{" + ",".join(option.choices) + "}"
    return option.long.upper().replace("-", "_")


def _help(option: Option) -> str:
    text = option.help or " "
    notes = ["repeatable"] if option.repeatable else []
    if option.required:
        notes.append("required")
    elif option.default is not None and option.default is not False:
        notes.append(f"default: {option.default}")
    return f"{text} ({'; '.join(notes)})" if notes else text


def _argparse_type(option: Option, folder: str | None) -> Callable[[str], object]:
    def checked(text: str) -> object:
        try:
            return _convert_one(option, text, working_directory() if folder is None else folder)
        except InvalidValue as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    checked.__name__ = getattr(option.type, "__name__", "value")
    return checked


# -- converters ------------------------------------------------------------------------

# A day: longer than any timeout anyone means, and short enough for every timer to hold
# (poll() takes milliseconds in a C int).
LONGEST = 86_400.0


def seconds(text: str) -> float:
    """A duration in seconds, from 0 to a day."""
    return _duration(text, positive=False)


def positive_seconds(text: str) -> float:
    """A duration in seconds, more than 0 and at most a day."""
    return _duration(text, positive=True)


def _duration(text: str, *, positive: bool) -> float:
    # ASCII digits and a point only: float() also takes " 5", "1_0", "inf", other digits.
    value = float(text) if re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", text) else math.nan
    low_ok = value > 0 if positive else value >= 0
    if not (low_ok and value <= LONGEST):
        low = "more than 0" if positive else "from 0"
        raise argparse.ArgumentTypeError(
            f"invalid duration {quote(text)}: expected seconds {low} to {LONGEST:.0f}"
        )
    return value


def count(text: str) -> int:
    """A whole number, 0 or more, written in ASCII digits."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"invalid count {quote(text)}: expected a whole number")
    return int(text)
