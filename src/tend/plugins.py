"""Plugins: ServiceMaker, Option, Flag, and finding the plugins installed.

A plugin is a module-level ServiceMaker instance, found two ways: the entry-point group
``tend.plugins`` (for installed packages) and any ``*.py`` file in a ``tend_plugins/``
folder on ``sys.path`` (drop a file in, no ``__init__.py`` needed, as twistd's
``twisted/plugins/``). Modules are imported only when a plugin is asked for or listed.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType

from tend.errors import StartupError, TendError, UsageError, quote
from tend.options import CommandParser, Flag, InvalidValue, Option, add_options, values_of
from tend.service import Service

__all__ = [
    "Flag",
    "Option",
    "PluginIndex",
    "PluginLoadError",
    "ServiceMaker",
    "find_plugin",
    "find_plugins",
    "make_service",
]

ENTRY_POINT_GROUP = "tend.plugins"
PLUGIN_FOLDER = "tend_plugins"


class ServiceMaker:
    """Makes the service a plugin runs (twistd: IServiceMaker + IPlugin).

    Subclass it, set ``name``, ``description`` and ``options``, implement
    :meth:`make_service`, and leave an instance at module level. An ``epilog``, if set,
    ends the plugin's ``--help`` as written (twistd: a longer ``usage`` text).
    """

    name: str = ""
    description: str = ""
    epilog: str | None = None
    options: Sequence[Option | Flag] = ()

    def make_service(self, options: Mapping[str, object]) -> Service:
        """Build the service to run from the parsed *options* (twistd: makeService)."""
        raise NotImplementedError(f"{type(self).__name__} does not define make_service")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def parser(self, prog: str, folder: str | None = None) -> argparse.ArgumentParser:
        """An argument parser for this plugin's options; relative paths from *folder* (by
        default the current directory)."""
        parser = CommandParser(
            prog=prog,
            description=self.description,
            epilog=self.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_options(parser, self.options, negatable=False, folder=folder)
        return parser

    def parse_options(
        self, arguments: Sequence[str], prog: str, folder: str | None = None
    ) -> dict[str, object]:
        """Parse *arguments* into the mapping ``make_service`` receives.

        An option left out takes its default; a default written as text (as twistd's
        were) arrives converted by the option's type, as a deployment file's would.
        """
        parsed = vars(self.parser(prog, folder).parse_args(list(arguments)))
        try:
            return values_of(self.options, parsed, folder)
        except InvalidValue as error:
            raise UsageError(f"plugin {quote(self.name)} has a bad default: {error}") from None


def make_service(maker: ServiceMaker, options: Mapping[str, object], where: str) -> Service:
    """Call *maker*'s ``make_service``; a failure becomes one line starting with *where*.

    A TendError is the plugin's own line for the user; anything else is a bug in the
    plugin, whose traceback goes to the log.

    Raises:
        StartupError: the plugin failed to make its service.
    """
    try:
        return maker.make_service(options)
    except TendError as error:
        if not where:
            raise
        raise StartupError(f"{where}{error}") from None
    except SystemExit as error:
        status = quote(error.code) if isinstance(error.code, str) else error.code
        raise StartupError(
            f"{where}plugin {quote(maker.name)} called sys.exit({status}) while making its service"
        ) from None
    except Exception as error:
        logging.getLogger("tend").exception(
            "%splugin %r failed to make its service", where, maker.name
        )
        raise StartupError(
            f"{where}plugin {quote(maker.name)} failed to make its service: "
            f"{type(error).__name__}: {error} (the traceback is in the log)"
        ) from None


class PluginLoadError(Exception):
    """A plugin module that failed to import; kept so the others still list and run."""

    def __init__(self, origin: str, error: BaseException) -> None:
        super().__init__(f"{origin}: {type(error).__name__}: {error}")
        self.origin = origin
        self.error = error


@dataclass(slots=True)
class PluginIndex:
    """The plugins found, by name, and the modules that failed to load.

    ``origins`` says where each maker came from, for the warning about a later plugin of
    the same name (``entry point 'poetry = tend.poetry.plugin:service_maker'``, a path).
    """

    makers: dict[str, ServiceMaker]
    failures: list[PluginLoadError]
    origins: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, maker: ServiceMaker, origin: str) -> None:
        """Keep *maker* under *name* unless a plugin found earlier has it: then warn."""
        if name not in self.makers:
            self.makers[name] = maker
            self.origins[name] = origin
        elif self.makers[name] is not maker:
            logging.getLogger("tend").warning(
                "tend: plugin %s in %s is ignored: %s has the same name; rename one of them",
                quote(name),
                origin,
                self.origins[name],
            )


@dataclass(frozen=True, slots=True)
class EntryPoint:
    """One ``name = module:attribute`` line of an installed package's ``tend.plugins``."""

    name: str
    value: str

    def load(self) -> object:
        module_name, _, attribute = self.value.partition(":")
        value: object = importlib.import_module(module_name.strip())
        for part in attribute.strip().split(".") if attribute.strip() else ():
            value = getattr(value, part)
        return value


def _entry_points() -> list[EntryPoint]:
    """The ``tend.plugins`` entry points of the packages installed on ``sys.path``.

    Read straight from each ``*.dist-info/entry_points.txt``: importing importlib.metadata
    (and the email parser it brings) costs more than the rest of tend's start-up. The
    first package on ``sys.path`` to name an entry point wins, as importlib.metadata does.
    """
    found: dict[str, EntryPoint] = {}
    for folder in sys.path:
        try:
            names = [entry.name for entry in os.scandir(folder or os.curdir) if entry.is_dir()]
        except OSError:
            continue
        for name in sorted(names):
            if name.endswith((".dist-info", ".egg-info")):
                path = os.path.join(folder or os.curdir, name, "entry_points.txt")
                for entry in _read_entry_points(path):
                    found.setdefault(entry.name, entry)
    return list(found.values())


def _read_entry_points(path: str) -> list[EntryPoint]:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError:
        return []
    entries = []
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == ENTRY_POINT_GROUP and "=" in line:
            name, _, value = line.partition("=")
            entries.append(EntryPoint(name.strip(), value.split("[")[0].strip()))
    return entries


def _plugin_files() -> Iterator[str]:
    seen: set[str] = set()
    for entry in sys.path:
        folder = os.path.join(entry or os.curdir, PLUGIN_FOLDER)
        real = os.path.realpath(folder)
        if real in seen or not os.path.isdir(folder):
            continue
        seen.add(real)
        for filename in sorted(os.listdir(folder)):
            if filename.endswith(".py") and not filename.startswith("_"):
                yield os.path.join(folder, filename)


def _import_file(path: str) -> ModuleType:
    stem = os.path.splitext(os.path.basename(path))[0]
    module_name = f"{PLUGIN_FOLDER}.{stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _makers_in(module: ModuleType) -> Iterator[ServiceMaker]:
    for value in vars(module).values():
        if isinstance(value, ServiceMaker):
            yield value


def _load_entry_point(entry: EntryPoint, index: PluginIndex) -> None:
    try:
        value = entry.load()
    except Exception as error:
        index.failures.append(PluginLoadError(f"entry point {quote(entry.name)}", error))
        return
    if isinstance(value, ServiceMaker):
        origin = f"the installed entry point {quote(f'{entry.name} = {entry.value}')}"
        index.add(value.name or entry.name, value, origin)
    else:
        index.failures.append(
            PluginLoadError(
                f"entry point {quote(entry.name)}",
                TypeError(f"{entry.value} is not a tend.ServiceMaker instance"),
            )
        )


def _load_file(path: str, index: PluginIndex) -> None:
    try:
        module = _import_file(path)
    except Exception as error:
        index.failures.append(PluginLoadError(path, error))
        return
    for maker in _makers_in(module):
        index.add(maker.name, maker, path)


def find_plugins() -> PluginIndex:
    """Load every plugin, entry points first; a broken module is recorded, not raised."""
    index = PluginIndex({}, [])
    for entry in _entry_points():
        _load_entry_point(entry, index)
    for path in _plugin_files():
        _load_file(path, index)
    return index


def find_plugin(name: str) -> ServiceMaker:
    """Find the plugin called *name*, importing as little as possible.

    Raises:
        UsageError: no plugin has that name; the message names close matches, and any
            plugin module that failed to load, since it may be the one meant.
    """
    index = PluginIndex({}, [])
    for entry in _entry_points():
        if entry.name == name:
            _load_entry_point(entry, index)
            if name in index.makers:
                # A drop-in of the same name is ignored; loading the drop-ins (if there
                # are any) is what lets find_plugin say so.
                for path in _plugin_files():
                    _load_file(path, index)
                return index.makers[name]
    index = find_plugins()
    if name in index.makers:
        return index.makers[name]
    raise UsageError(unknown_plugin_message(name, index))


def unknown_plugin_message(name: str, index: PluginIndex) -> str:
    """Say that *name* is not a plugin, suggesting close matches."""
    import difflib

    message = f"unknown plugin {quote(name)}"
    matches = difflib.get_close_matches(name, list(index.makers), n=3)
    if matches:
        message += "; did you mean " + " or ".join(repr(match) for match in matches) + "?"
    else:
        message += "; run 'tend' to list the plugins"
    for failure in index.failures:
        message += f" (a plugin failed to load: {failure})"
    return message
