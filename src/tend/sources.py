"""What a service tree is built from, and building it again with fresh code for a reload.

A tree comes from a plugin and its options, an app file, or a deployment file. The first
build happens at start; a reload builds the tree again from the same source, after
forgetting the modules that came with it (the plugin's package, the app file's folder),
so the new tree runs the code as it is on disk now. Makes no OS calls but reading the
files it builds from and looking at the current directory.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from tend.errors import quote
from tend.files import working_directory
from tend.service import Application

if TYPE_CHECKING:
    from tend.plugins import ServiceMaker


class TreeSource:
    """A source of service trees: `build` makes one, `rebuild` makes one with fresh code."""

    #: How messages name the source: ``app file 'app.py'``.
    description = "the service tree"

    def build(self) -> Application:
        raise NotImplementedError

    def rebuild(self) -> Application:
        """Build again, after forgetting this source's modules so they are imported anew."""
        forget_modules(self.module_prefixes(), self.module_folders())
        return self.build()

    def module_prefixes(self) -> list[str]:
        """Dotted names whose modules (and their submodules) a rebuild imports anew."""
        return []

    def module_folders(self) -> list[str]:
        """Folders whose modules a rebuild imports anew."""
        return []

    def watched_files(self) -> list[str]:
        """The files whose change means the tree should be built again (``--reload``)."""
        prefixes, folders = self.module_prefixes(), self.module_folders()
        files = []
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if isinstance(path, str) and _belongs(
                getattr(module, "__name__", ""), path, prefixes, folders
            ):
                files.append(path)
        return sorted(set(files))


def _reloaded_prefix(module: str) -> str:
    """What a reload imports anew for a plugin defined in *module*: its package, unless
    that is tend itself (for tend.builtins.web, the module alone)."""
    package = module.rpartition(".")[0]
    return module if package in ("", "tend", "tend.builtins") else package


class PluginSource(TreeSource):
    """A plugin by name, with its command-line options."""

    def __init__(self, name: str, arguments: Sequence[str]) -> None:
        self.name = name
        self.arguments = list(arguments)
        self.description = f"plugin {quote(name)}"
        # Relative paths among the options are from where tend was started, for a reload
        # too (the daemon has changed directory since, and that one may even be gone).
        self.folder = working_directory()
        self._module = ""
        self._checked: tuple[ServiceMaker, Mapping[str, object]] | None = None

    def check(self) -> None:
        """Find the plugin and parse its options now, so that a mistake is a usage error.

        Raises:
            UsageError: no such plugin, or a bad option.
        """
        self._checked = self._parse()

    def _parse(self) -> tuple[ServiceMaker, Mapping[str, object]]:
        from tend.plugins import find_plugin

        maker = find_plugin(self.name)
        self._module = type(maker).__module__
        return maker, maker.parse_options(self.arguments, f"tend {self.name}", self.folder)

    def build(self) -> Application:
        """Wrap the plugin's service in an Application, as twistd does for a plugin."""
        from tend.plugins import make_service

        maker, options = self._checked or self._parse()
        self._checked = None  # a rebuild finds the plugin again, with its code as it is now
        application = Application(self.name)
        make_service(maker, options, "").set_service_parent(application)
        return application

    def module_prefixes(self) -> list[str]:
        return [_reloaded_prefix(self._module)] if self._module else []


class AppFileSource(TreeSource):
    """An app file: a Python file that defines ``application``."""

    def __init__(self, path: str) -> None:
        self.given = path
        # From where tend was started, for a reload too: --rundir changes directory first.
        self.path = os.path.join(working_directory(), path)
        self.started_in = os.stat(".")
        self.description = f"app file {quote(path)}"

    def build(self) -> Application:
        from tend.appfile import load_application

        # Messages name the file as the user typed it, while that still leads to it.
        here = os.path.samestat(os.stat("."), self.started_in)
        return load_application(self.given if here else self.path)

    def module_folders(self) -> list[str]:
        # The modules the app file imports from beside it.
        return [os.path.dirname(os.path.realpath(self.path))]

    def watched_files(self) -> list[str]:
        return sorted({os.path.abspath(self.path), *super().watched_files()})


class DeploymentSource(TreeSource):
    """A deployment file: the plugins and their options, in TOML."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.description = f"deployment file {quote(path)}"
        self._modules: list[str] = []
        self._settings: Mapping[str, object] | None = None  # [tend], as read at start

    def load(self) -> object:
        """Read and check the file (the runner settings of its ``[tend]`` table too).

        ``[tend]`` is read at start only; a reload that finds it changed says so.
        """
        from tend.deploy import load_deployment

        deployment = load_deployment(self.path)
        self._modules = sorted({type(entry.maker).__module__ for entry in deployment.services})
        if self._settings is None:
            self._settings = deployment.settings
        elif deployment.settings != self._settings:
            changed = sorted(
                key.replace("_", "-")
                for key in {*deployment.settings, *self._settings}
                if deployment.settings.get(key) != self._settings.get(key)
            )
            logging.getLogger("tend").warning(
                "%s: [tend] changed (%s): the runner's settings take effect at the next "
                "start or upgrade, not in a reload",
                self.description,
                ", ".join(changed),
            )
            self._settings = deployment.settings
        return deployment

    def build(self) -> Application:
        from tend.deploy import Deployment

        deployment = self.load()
        assert isinstance(deployment, Deployment)
        return deployment.build()

    def module_prefixes(self) -> list[str]:
        return [_reloaded_prefix(module) for module in self._modules]

    def watched_files(self) -> list[str]:
        return sorted({self.path, *super().watched_files()})


class WithConsole(TreeSource):
    """Another source's trees, each with a console (``tend manhole``) added: ``--console``.

    The console is a child named ``console`` of every tree built, a reload's included; each
    worker listens on its own socket (PATH for worker 1, PATH.N for worker N).
    """

    def __init__(self, source: TreeSource, path: str) -> None:
        self.source = source
        self.path = path
        self.description = source.description

    def build(self) -> Application:
        return self._with_console(self.source.build())

    def rebuild(self) -> Application:
        return self._with_console(self.source.rebuild())

    def _with_console(self, application: Application) -> Application:
        from tend.builtins.manhole import ManholeService

        ManholeService(self.path, name="console").set_service_parent(application)
        return application

    def module_prefixes(self) -> list[str]:
        return self.source.module_prefixes()

    def module_folders(self) -> list[str]:
        return self.source.module_folders()

    def watched_files(self) -> list[str]:
        return self.source.watched_files()


def forget_modules(prefixes: Sequence[str], folders: Sequence[str]) -> list[str]:
    """Remove from ``sys.modules`` the modules named by *prefixes* or found in *folders*.

    The next import runs their code afresh. Modules of tend's framework are never
    forgotten: the supervisor runs on them. Returns the names forgotten.
    """
    forgotten = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if _belongs(name, path, prefixes, folders):
            del sys.modules[name]
            forgotten.append(name)
    importlib.invalidate_caches()
    return forgotten


def _belongs(name: str, path: object, prefixes: Sequence[str], folders: Sequence[str]) -> bool:
    if _is_framework(name):
        return False
    if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
        return True
    if isinstance(path, str) and folders:
        real = os.path.realpath(path)
        return any(real.startswith(folder.rstrip(os.sep) + os.sep) for folder in folders)
    return False


def _is_framework(name: str) -> bool:
    """tend's own modules: tend itself and its framework, not the apps shipped inside it."""
    if name == "tend" or name == "tend.builtins":
        return True
    if not name.startswith("tend."):
        return False
    return not name.startswith(("tend.poetry", "tend.builtins."))
