"""Deployment files: the services one daemon runs, listed in TOML (``tend -c FILE.toml``).

::

    [tend]                        # optional: runner options, named as on the command line
    pidfile = "poetry.pid"        # relative paths are relative to this file's folder
    logfile = "poetry.log"

    [[service]]                   # any number of these: a plugin and its options
    plugin = "poetry"
    name = "ecstasy"              # optional; the default is PLUGIN-N (N counts from 1)
    port = 10000
    poem = "poems/ecstasy.txt"

Everything is checked when the file is loaded, before tend opens a log or detaches, and
every error names the file, the entry and the key. Building the tree afterwards only
calls each plugin's ``make_service`` with options already converted, and attaches each
service to the Application under its entry's name. This module reads files and imports
plugins; it makes no other OS calls.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tend.endpoints import Endpoint, TCPEndpoint, TLSEndpoint, UNIXEndpoint
from tend.errors import StartupError, TendError, quote
from tend.files import DEPLOYMENT_FILE_LIMIT, read_file
from tend.net import listeners
from tend.options import Flag, InvalidValue, Option, convert, default_of, describe_value
from tend.plugins import ServiceMaker, find_plugin, make_service
from tend.service import Application
from tend.settings import SETTINGS

# Keys of a [[service]] table that are not the plugin's options (so a plugin option with
# one of these names cannot be set from a deployment file).
_ENTRY_KEYS = ("plugin", "name")


class DeploymentError(StartupError):
    """A deployment file that cannot be read, parsed or checked (exit 1)."""


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """One ``[[service]]`` table, checked: its plugin and its converted options."""

    index: int
    name: str
    plugin: str
    maker: ServiceMaker
    options: Mapping[str, object]

    @property
    def label(self) -> str:
        """How error messages name the entry: ``entry 2 ('poetry-2')``."""
        return f"entry {self.index} ({quote(self.name)})"


@dataclass(frozen=True, slots=True)
class Deployment:
    """A checked deployment file: the runner settings of ``[tend]`` and the services.

    ``settings`` is keyed by setting key (``log_max_bytes``), with
    values converted as the command line would convert them and relative paths already
    made absolute.
    """

    path: str
    display: str
    settings: Mapping[str, object]
    services: tuple[ServiceEntry, ...]

    @property
    def name(self) -> str:
        """The Application's name: the file's name without ``.toml``."""
        return os.path.splitext(os.path.basename(self.path))[0]

    def build(self) -> Application:
        """Make each entry's service and attach it to a new Application under its name.

        Raises:
            DeploymentError: an entry's service cannot be made, or two entries would
                listen on the same address (the message names both).
        """
        application = Application(self.name)
        bound: list[tuple[ServiceEntry, Endpoint]] = []
        for entry in self.services:
            where = f"{self.display}: {entry.label}: "
            try:
                service = make_service(entry.maker, entry.options, where)
                service.name = entry.name
                service.set_service_parent(application)
            except StartupError as error:
                raise DeploymentError(str(error)) from None
            except TendError as error:
                raise DeploymentError(f"{where}{error}") from None
            for server in listeners(service):
                for other, endpoint in bound:
                    if other is not entry and _same_address(endpoint, server.endpoint):
                        raise DeploymentError(
                            f"{self.display}: {other.label} and {entry.label} both listen on "
                            f"{server.endpoint}; give each entry its own port"
                        )
                bound.append((entry, server.endpoint))
        return application


def _same_address(first: Endpoint, second: Endpoint) -> bool:
    """Whether binding both would clash, as far as can be told without resolving names.

    A clash the names hide (``localhost`` and ``127.0.0.1``) is left to the bind's own
    "address already in use".
    """
    if isinstance(first, UNIXEndpoint) and isinstance(second, UNIXEndpoint):
        return os.path.abspath(first.path) == os.path.abspath(second.path)
    if not (
        isinstance(first, TCPEndpoint | TLSEndpoint)
        and isinstance(second, TCPEndpoint | TLSEndpoint)
    ):
        return False  # systemd's sockets may be shared; a UNIX path never meets a port
    if first.port == 0 or first.port != second.port or (first.reuse_port and second.reuse_port):
        return False
    hosts = {first.interface or "0.0.0.0", second.interface or "0.0.0.0"}
    # One host, or a wildcard: "::" takes IPv4 too, "0.0.0.0" every IPv4 interface.
    return (
        len(hosts) == 1
        or "::" in hosts
        or ("0.0.0.0" in hosts and not any(":" in h for h in hosts))
    )


def load_deployment(path: str) -> Deployment:
    """Read, parse and check the deployment file at *path*.

    Raises:
        DeploymentError: the message names the file, the entry and the key at fault.
    """
    absolute = os.path.abspath(path)
    # Heads every message about the file: shortened, its odd characters escaped.
    display = quote(_display(absolute), bare=True)
    folder = os.path.dirname(absolute)
    document = _parse(absolute, display)
    unknown = [key for key in document if key not in ("tend", "service")]
    if unknown:
        key = unknown[0]
        value = document[key]
        is_table = isinstance(value, dict) or (
            isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
        )
        kind = "table" if is_table else "key"
        raise DeploymentError(
            f"{display}: unknown {kind} {quote(key)}"
            + _suggest(
                key,
                ["tend", "service"],
                "; runner options go under [tend], services under [[service]]",
            )
        )
    tend_table = document.get("tend", {})
    if not isinstance(tend_table, dict):
        raise DeploymentError(
            f"{display}: 'tend' must be a table: write [tend] above the runner options"
        )
    settings = _settings(tend_table, folder, f"{display}: [tend]")
    services = _entries(document.get("service"), folder, display)
    return Deployment(absolute, display, settings, services)


def _display(path: str) -> str:
    """The file's name as a message shows it: relative to here if it is below here."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def _parse(path: str, display: str) -> dict[str, object]:
    try:
        data = read_file(path, "deployment file", DEPLOYMENT_FILE_LIMIT, name=_display(path))
    except StartupError as error:
        raise DeploymentError(str(error)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DeploymentError(f"{display}: line {line}: not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise DeploymentError(_syntax_error(display, str(error))) from None
    except RecursionError:
        raise DeploymentError(f"{display}: TOML nested too deeply to read") from None
    except ValueError as error:  # an integer past Python's digit limit
        raise DeploymentError(f"{display}: TOML value cannot be read: {error}") from None


def _syntax_error(display: str, message: str) -> str:
    """Turn tomllib's "Reason (at line 7, column 5)" into "FILE: line 7: TOML syntax error: ..."."""
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
    if match is None:
        reason = message.removesuffix(" (at end of document)")
        where = ": end of file" if reason != message else ""
        return f"{display}{where}: TOML syntax error: {_lower(reason)}"
    reason, line, column = match.groups()
    return f"{display}: line {line}: TOML syntax error: {_lower(reason)} (column {column})"


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def _suggest(word: str, choices: Iterable[str], otherwise: str = "") -> str:
    matches = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {quote(matches[0])}?" if matches else otherwise


# -- [tend] ---------------------------------------------------------------------------------


def _settings(table: Mapping[str, object], folder: str, where: str) -> dict[str, object]:
    """The runner settings [tend] gives, converted, keyed as the command line's."""
    known = {option.long: option for option in SETTINGS}
    settings: dict[str, object] = {}
    for long, value in _normalized(table, known, where, "option"):
        option = known[long]
        try:
            settings[option.key] = convert(option, value, folder)
        except InvalidValue as error:
            raise DeploymentError(f"{where}: option {quote(long)}: {error}") from None
    return settings


def _normalized(
    table: Mapping[str, object], known: Mapping[str, object], where: str, what: str
) -> list[tuple[str, object]]:
    """The table's items with keys spelled as the long names (``log_max_bytes`` too)."""
    items: list[tuple[str, object]] = []
    seen: dict[str, str] = {}
    for key, value in table.items():
        long = key.replace("_", "-")
        if long not in known and key in known:
            long = key
        if long not in known:
            choices = [name for name in known if name not in _ENTRY_KEYS]
            raise DeploymentError(f"{where}: unknown {what} {quote(key)}" + _suggest(long, choices))
        if long in seen:
            raise DeploymentError(
                f"{where}: {what} {quote(long)} is given twice, "
                f"as {quote(seen[long])} and as {quote(key)}"
            )
        seen[long] = key
        items.append((long, value))
    return items


# -- [[service]] ----------------------------------------------------------------------------


def _entries(tables: object, folder: str, display: str) -> tuple[ServiceEntry, ...]:
    if tables is None:
        raise DeploymentError(
            f'{display}: lists no services; add a [[service]] table with plugin = "NAME"'
        )
    if isinstance(tables, dict):
        raise DeploymentError(
            f"{display}: 'service' must be an array of tables: write [[service]], not [service]"
        )
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise DeploymentError(
            f"{display}: 'service' must be an array of tables, each one written [[service]]"
        )
    if not tables:
        raise DeploymentError(
            f'{display}: lists no services; add a [[service]] table with plugin = "NAME"'
        )
    makers: dict[str, ServiceMaker] = {}
    entries: list[ServiceEntry] = []
    names: dict[str, int] = {}
    for index, table in enumerate(tables, start=1):
        entry = _entry(index, table, folder, display, makers)
        if entry.name in names:
            raise DeploymentError(
                f"{display}: {entry.label}: the name {quote(entry.name)} is already used by "
                f"entry {names[entry.name]}; give each service its own name"
            )
        names[entry.name] = index
        entries.append(entry)
    return tuple(entries)


def _entry(
    index: int,
    table: Mapping[str, object],
    folder: str,
    display: str,
    makers: dict[str, ServiceMaker],
) -> ServiceEntry:
    plugin = table.get("plugin")
    name = table.get("name")
    if name is None and isinstance(plugin, str) and plugin:
        name = f"{plugin}-{index}"
    label = f"entry {index} ({quote(name)})" if isinstance(name, str) else f"entry {index}"
    where = f"{display}: {label}"
    if "name" in table and not (isinstance(name, str) and name):
        raise DeploymentError(
            f"{where}: 'name' must be a non-empty string, not {describe_value(name)}"
        )
    if plugin is None:
        raise DeploymentError(f'{where}: no plugin given; name one, as plugin = "poetry"')
    if not isinstance(plugin, str) or not plugin:
        raise DeploymentError(
            f"{where}: 'plugin' must be a plugin's name, not {describe_value(plugin)}"
        )
    assert isinstance(name, str)
    maker = makers.get(plugin)
    if maker is None:
        try:
            maker = makers[plugin] = find_plugin(plugin)
        except TendError as error:
            raise DeploymentError(f"{where}: {error}") from None
    options = _plugin_options(maker, table, folder, where)
    return ServiceEntry(index, name, plugin, maker, options)


def _plugin_options(
    maker: ServiceMaker, table: Mapping[str, object], folder: str, where: str
) -> dict[str, object]:
    """The mapping ``make_service`` receives, as the command line would have built it."""
    known: dict[str, Option | Flag] = {option.long: option for option in maker.options}
    given = {key: value for key, value in table.items() if key not in _ENTRY_KEYS}
    values = dict(_normalized(given, known, where, "option"))
    options: dict[str, object] = {}
    for long, option in known.items():
        try:
            if long in values:
                options[option.key] = convert(option, values[long], folder)
            elif isinstance(option, Option) and option.required:
                raise DeploymentError(
                    f"{where}: missing option {quote(long)}, "
                    f"which plugin {quote(maker.name)} requires"
                )
            else:
                options[option.key] = default_of(option, folder)
        except InvalidValue as error:
            raise DeploymentError(f"{where}: option {quote(long)}: {error}") from None
    return options
