"""The rules the modules' docstrings and the README state, checked on the source itself."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "tend"


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(SOURCE.rglob("*.py")):
        name = path.relative_to(SOURCE).as_posix()
        yield name, ast.parse(path.read_text(encoding="utf-8"), str(path))


def calls(tree: ast.Module) -> Iterator[str]:
    """Every call's dotted name: ``os.fork``, ``signal.signal``, ``loop.add_signal_handler``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts = []
            target = node.func
            while isinstance(target, ast.Attribute):
                parts.append(target.attr)
                target = target.value
            if isinstance(target, ast.Name):
                parts.append(target.id)
            yield ".".join(reversed(parts))


def callers_of(names: set[str], suffixes: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The modules that call any of *names* (exact) or a method named one of *suffixes*."""
    found = set()
    for module, tree in modules():
        for called in calls(tree):
            if called in names or called.rsplit(".", 1)[-1] in suffixes:
                found.add(module)
    return found


RULES = [
    (
        "only signals.py installs signal handlers",
        {"signal.signal", "signal.set_wakeup_fd", "signal.pthread_sigmask"},
        {"add_signal_handler", "remove_signal_handler"},
        {"signals.py"},
    ),
    (
        "only daemon.py forks, detaches, sets the umask, chroots or ends a process at once",
        {"os.fork", "os.setsid", "os.umask", "os.chroot", "os._exit", "os.forkpty"},
        set(),
        {"daemon.py"},
    ),
    (
        "only privileges.py changes the user or group",
        {
            "os.setuid",
            "os.seteuid",
            "os.setresuid",
            "os.setgid",
            "os.setegid",
            "os.setresgid",
            "os.setgroups",
            "os.initgroups",
        },
        set(),
        {"privileges.py"},
    ),
    (
        "only the entry points print or exit",
        {"print", "sys.exit"},
        set(),
        {"cli.py", "ctl.py", "poetry/client.py"},
    ),
    (
        "only serve.py runs an event loop (and get-poetry, a command of its own)",
        {"asyncio.run", "asyncio.Runner"},
        {"run_until_complete", "run_forever"},
        {"serve.py", "poetry/client.py"},
    ),
]


@pytest.mark.parametrize(
    ("rule", "names", "methods", "allowed"), RULES, ids=[rule[0] for rule in RULES]
)
def test_rule_holds(rule: str, names: set[str], methods: set[str], allowed: set[str]) -> None:
    """Each stated rule holds: no module outside the allowed ones makes those calls."""
    assert callers_of(names, methods) <= allowed, rule


@pytest.mark.parametrize("module", ["service.py", "errors.py", "addresses.py"])
def test_a_module_that_says_it_makes_no_os_calls_makes_none(module: str) -> None:
    """Those modules' docstrings say "Makes no OS calls": no os, socket, fcntl, open calls."""
    tree = ast.parse((SOURCE / module).read_text(encoding="utf-8"))
    assert "no OS calls" in (ast.get_docstring(tree) or "")
    offenders = [
        called
        for called in calls(tree)
        if called.split(".")[0] in ("os", "socket", "fcntl", "signal", "select", "open")
    ]
    assert offenders == []


def test_tend_modules_log_through_the_tend_logger() -> None:
    """The framework logs as "tend" (shown as [-]); only an application names its own logger."""
    offenders = []
    for module, tree in modules():
        if module.startswith(("poetry/", "builtins/", "logs/")):
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger"
                and node.args  # getLogger() is the root logger, named by nobody
                and not (
                    len(node.args) == 1
                    and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value == "tend"
                )
            ):
                offenders.append(f"{module}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("package", ["poetry", "builtins"])
def test_the_apps_use_only_the_public_api(package: str) -> None:
    """tend.poetry and the built-in plugins import tend itself and their own modules,
    nothing else of tend's: what they need, any plugin can have."""
    own = f"tend.{package}"
    offenders = []
    for module, tree in modules():
        if not module.startswith(f"{package}/"):
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("tend.")
                and not node.module.startswith(own)
            ):
                offenders.append(f"{module}:{node.lineno}: {node.module}")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("tend.") and not alias.name.startswith(own):
                        offenders.append(f"{module}:{node.lineno}: {alias.name}")
    assert offenders == []


def test_no_module_reads_a_private_attribute_of_logging_or_argparse() -> None:
    """tend leaves the logging module's internals alone, and argparse's."""
    offenders = []
    for module, tree in modules():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in ("logging", "argparse")
            ):
                offenders.append(f"{module}:{node.lineno}: {node.value.id}.{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr == "_actions":
                offenders.append(f"{module}:{node.lineno}: _actions")
    assert offenders == []


def test_no_module_changes_logging_globals() -> None:
    """No assignment to a logging module attribute, and no record factory installed."""
    offenders = []
    for module, tree in modules():
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "logging"
                ):
                    offenders.append(f"{module}:{node.lineno}")
        if "logging.setLogRecordFactory" in set(calls(tree)):
            offenders.append(f"{module}: setLogRecordFactory")
    assert offenders == []
