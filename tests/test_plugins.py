"""Tests for tend.plugins: options, parsing, and finding plugins in folders and entry points."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tend.errors import StartupError, UsageError
from tend.plugins import (
    Flag,
    Option,
    PluginLoadError,
    ServiceMaker,
    find_plugin,
    find_plugins,
    make_service,
)
from tend.service import Service

HELLO = """
    import tend

    class HelloMaker(tend.ServiceMaker):
        name = "hello"
        description = "Says hello."

        def make_service(self, options):
            return tend.Service("hello")

    hello_maker = HelloMaker()
"""

WritePlugin = Callable[[str, str], Path]


def integer(text: str) -> int:
    """Read a whole number, as a plugin's option type would."""
    return int(text)


def even(text: str) -> int:
    """Accept only even numbers, rejecting others with an argparse message."""
    number = int(text)
    if number % 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not even")
    return number


class CountingMaker(ServiceMaker):
    """A plugin with one of each kind of option."""

    name = "counting"
    description = "Counts things."
    options = (
        Option("port", "p", "10000", "The port to listen on.", type=integer),
        Option("poem-file", None, None, "The poem to serve."),
        Option("start-at", None, 7, "Where counting starts.", type=integer),
        Flag("log-every-byte", "v", "Log every byte."),
    )

    def make_service(self, options: Mapping[str, object]) -> Service:
        return Service(self.name)


@pytest.fixture
def plugin_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A `tend_plugins/` folder (no __init__.py) on sys.path; its modules are forgotten after."""
    root = tmp_path / "site"
    folder = root / "tend_plugins"
    folder.mkdir(parents=True)
    monkeypatch.syspath_prepend(str(root))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if name == "tend_plugins" or name.startswith("tend_plugins."):
            del sys.modules[name]


@pytest.fixture
def write_plugin(plugin_folder: Path) -> WritePlugin:
    """Write a plugin module into the `tend_plugins/` folder on sys.path."""

    def write(filename: str, source: str) -> Path:
        path = plugin_folder / filename
        path.write_text(textwrap.dedent(source))
        return path

    return write


# Options


def test_option_and_flag_keys_turn_dashes_into_underscores() -> None:
    """An option's key is its long name with dashes as underscores."""
    assert Option("poem-file").key == "poem_file"
    assert Flag("log-every-byte").key == "log_every_byte"
    assert Option("port").key == "port"


def test_option_defaults() -> None:
    """Option(long) has no short name, no default, str as type, and is not required."""
    option = Option("poem")

    assert (option.short, option.default, option.help, option.type, option.required) == (
        None,
        None,
        "",
        str,
        False,
    )


def test_parse_options_gives_defaults_converted_by_type() -> None:
    """With no arguments, every option arrives under its key, text defaults converted."""
    parsed = CountingMaker().parse_options([], "tend counting")

    assert parsed == {"port": 10000, "poem_file": None, "start_at": 7, "log_every_byte": False}
    assert isinstance(parsed["port"], int)


def test_parse_options_converts_values_through_type() -> None:
    """Values given long or short arrive converted by the option's type."""
    maker = CountingMaker()

    parsed = maker.parse_options(
        ["-p", "8000", "--poem-file", "ecstasy.txt", "--start-at", "3", "-v"], "tend counting"
    )

    assert parsed == {
        "port": 8000,
        "poem_file": "ecstasy.txt",
        "start_at": 3,
        "log_every_byte": True,
    }
    assert maker.parse_options(["--port=9000"], "tend counting")["port"] == 9000


def test_text_default_goes_through_the_type_once() -> None:
    """A default written as text reaches make_service converted by the type, exactly once."""
    calls: list[str] = []

    def shout(text: str) -> str:
        calls.append(text)
        return text.upper() + "!"

    class Maker(ServiceMaker):
        options = (Option("greeting", None, "hello", type=shout),)

    assert Maker().parse_options([], "tend maker") == {"greeting": "HELLO!"}
    assert calls == ["hello"]


def test_repeatable_option_gathers_every_value_in_order() -> None:
    """A repeatable option given twice arrives as both values; left out, as its default."""

    class Maker(ServiceMaker):
        epilog = "Ends the help."
        options = (Option("listen", "p", "80", type=integer, repeatable=True),)

    maker = Maker()
    assert maker.parse_options([], "tend maker") == {"listen": [80]}
    assert maker.parse_options(["-p", "1", "--listen", "2", "-p1"], "tend maker") == {
        "listen": [1, 2, 1]
    }
    with pytest.raises(UsageError, match="argument -p/--listen: invalid literal for int"):
        maker.parse_options(["-p", "1", "-p", "x"], "tend maker")
    help_text = maker.parser("tend maker").format_help()
    assert "(repeatable; default: 80)" in help_text
    assert help_text.rstrip().endswith("Ends the help.")


def test_repeatable_option_without_a_default_arrives_empty() -> None:
    """No default and not given: an empty list, so make_service can always iterate."""

    class Maker(ServiceMaker):
        options = (Option("tag", None, None, repeatable=True),)

    assert Maker().parse_options([], "tend maker") == {"tag": []}


def test_non_text_default_arrives_as_it_is() -> None:
    """A default that is not text is not passed through the type."""
    marker = object()

    class Maker(ServiceMaker):
        options = (Option("thing", None, marker, type=integer),)

    assert Maker().parse_options([], "tend maker")["thing"] is marker


def usage_error(call: Callable[[], object]) -> tuple[str, str]:
    """The one line and the hint of the usage error *call* raises."""
    with pytest.raises(UsageError) as caught:
        call()
    assert caught.value.prog is not None
    assert caught.value.hint == f"try `{caught.value.prog} --help`"
    return f"{caught.value.prog}: {caught.value}", caught.value.hint


def test_required_option_missing_is_a_usage_error() -> None:
    """A required option left out is a usage error naming the option, with a hint."""

    class Maker(ServiceMaker):
        options = (Option("poem", None, None, "The poem.", required=True),)

    line, hint = usage_error(lambda: Maker().parse_options([], "tend maker"))
    assert line == "tend maker: error: the following arguments are required: --poem"
    assert hint == "try `tend maker --help`"


def test_required_option_given_is_accepted() -> None:
    """A required option, when given, arrives like any other."""

    class Maker(ServiceMaker):
        options = (Option("poem", None, None, "The poem.", required=True),)

    assert Maker().parse_options(["--poem", "x.txt"], "tend maker") == {"poem": "x.txt"}


def test_bad_value_from_value_error_names_the_option() -> None:
    """A type that raises ValueError gives a usage error naming the option."""
    line, _ = usage_error(lambda: CountingMaker().parse_options(["-p", "abc"], "tend counting"))
    assert line.startswith("tend counting: error: argument -p/--port: ")
    assert "'abc'" in line


def test_bad_value_from_argument_type_error_keeps_its_message() -> None:
    """A type raising ArgumentTypeError has its message shown after the option's name."""

    class Maker(ServiceMaker):
        options = (Option("count", "c", "2", type=even),)

    line, _ = usage_error(lambda: Maker().parse_options(["--count", "3"], "tend maker"))
    assert line == "tend maker: error: argument -c/--count: '3' is not even"


def test_poetry_port_error_names_the_option() -> None:
    """The poetry plugin rejects a bad endpoint as `argument -p/--port: invalid endpoint`."""
    maker = find_plugin("poetry")

    line, _ = usage_error(lambda: maker.parse_options(["--port", "tcp:abc"], "tend poetry"))
    assert line.startswith("tend poetry: error: argument -p/--port: invalid endpoint 'tcp:abc'")


def test_unknown_option_is_a_usage_error() -> None:
    """An option the plugin does not have is a usage error naming it."""
    line, _ = usage_error(lambda: CountingMaker().parse_options(["--colour", "blue"], "x"))
    assert line == "x: error: unrecognized arguments: --colour blue"


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    """--help shows the description and each option with its help and default."""
    with pytest.raises(SystemExit) as caught:
        CountingMaker().parse_options(["--help"], "tend counting")

    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tend counting")
    assert "Counts things." in out
    assert "--port PORT" in out  # "-p PORT, --port PORT" before 3.13, "-p, --port PORT" since
    assert "-p" in out
    assert "--poem-file POEM_FILE" in out
    assert "-v, --log-every-byte" in out
    assert "(default: 10000)" in out


def test_base_make_service_says_it_is_missing() -> None:
    """A ServiceMaker that does not define make_service says so when asked for a service."""

    class Lazy(ServiceMaker):
        name = "lazy"

    with pytest.raises(NotImplementedError, match="Lazy does not define make_service"):
        Lazy().make_service({})


# Discovery


def test_finds_instances_in_a_plugin_folder(write_plugin: WritePlugin) -> None:
    """A module in a `tend_plugins/` folder on sys.path contributes its ServiceMaker instances."""
    write_plugin("hello.py", HELLO)

    index = find_plugins()

    maker = index.makers["hello"]
    assert type(maker).__name__ == "HelloMaker"
    assert maker.description == "Says hello."
    assert index.failures == []
    service = maker.make_service({})
    assert isinstance(service, Service)
    assert service.name == "hello"


def test_find_plugin_finds_a_folder_plugin(write_plugin: WritePlugin) -> None:
    """find_plugin finds a plugin that lives in a `tend_plugins/` folder."""
    write_plugin("hello.py", HELLO)

    assert find_plugin("hello").name == "hello"


def test_finds_every_instance_in_one_module(write_plugin: WritePlugin) -> None:
    """A module may leave several instances; each one is a plugin."""
    write_plugin(
        "pair.py",
        """
        import tend

        class Maker(tend.ServiceMaker):
            def __init__(self, name):
                self.name = name

        first = Maker("first")
        second = Maker("second")
        """,
    )

    makers = find_plugins().makers

    assert makers["first"].name == "first"
    assert makers["second"].name == "second"


def test_classes_alone_are_not_plugins(write_plugin: WritePlugin) -> None:
    """A module that defines a ServiceMaker class but leaves no instance adds no plugin."""
    write_plugin(
        "classonly.py",
        """
        import tend

        class ClassOnlyMaker(tend.ServiceMaker):
            name = "classonly"
        """,
    )

    index = find_plugins()

    assert "classonly" not in index.makers
    assert index.failures == []


def test_skips_private_and_non_python_files(write_plugin: WritePlugin) -> None:
    """Files starting with an underscore, and files not ending in .py, are not imported."""
    write_plugin("_helpers.py", "raise RuntimeError('must not be imported')\n")
    write_plugin("notes.txt", "raise RuntimeError('must not be imported')\n")
    write_plugin("hello.py", HELLO)

    index = find_plugins()

    assert "hello" in index.makers
    assert index.failures == []


def test_broken_plugin_is_recorded_while_others_load(write_plugin: WritePlugin) -> None:
    """A plugin module that raises on import is recorded with its path; the others still load."""
    broken = write_plugin("broken.py", "raise RuntimeError('the muse has left')\n")
    write_plugin("hello.py", HELLO)

    index = find_plugins()

    assert "hello" in index.makers
    assert "poetry" in index.makers
    (failure,) = index.failures
    assert isinstance(failure, PluginLoadError)
    assert failure.origin == str(broken)
    assert isinstance(failure.error, RuntimeError)
    assert str(failure) == f"{broken}: RuntimeError: the muse has left"
    assert "tend_plugins.broken" not in sys.modules


def test_plugin_with_a_syntax_error_is_recorded(write_plugin: WritePlugin) -> None:
    """A plugin module that does not compile is recorded as a failure, not raised."""
    broken = write_plugin("typo.py", "def make_service(:\n")

    index = find_plugins()

    (failure,) = index.failures
    assert failure.origin == str(broken)
    assert isinstance(failure.error, SyntaxError)


def test_entry_point_is_found() -> None:
    """The installed entry point `poetry` is found, as the instance it names."""
    from tend.poetry.plugin import service_maker

    assert find_plugin("poetry") is service_maker
    assert find_plugins().makers["poetry"] is service_maker
    assert service_maker.description == "A fast poetry service."


def test_entry_point_wins_over_a_folder_plugin_of_the_same_name(
    write_plugin: WritePlugin,
) -> None:
    """A folder plugin named like an installed one does not replace it."""
    from tend.poetry.plugin import service_maker

    write_plugin(
        "impostor.py",
        """
        import tend

        class Impostor(tend.ServiceMaker):
            name = "poetry"

        impostor = Impostor()
        """,
    )

    assert find_plugins().makers["poetry"] is service_maker
    assert find_plugin("poetry") is service_maker


def test_a_folder_plugin_named_like_an_installed_one_is_reported(
    write_plugin: WritePlugin, caplog: pytest.LogCaptureFixture
) -> None:
    """Listing or running: one warning line naming the ignored file and the entry point."""
    from tend.poetry.plugin import service_maker

    path = write_plugin(
        "impostor.py",
        """
        import tend

        class Impostor(tend.ServiceMaker):
            name = "poetry"

        impostor = Impostor()
        """,
    )
    expected = (
        f"tend: plugin 'poetry' in {path} is ignored: the installed entry point "
        "'poetry = tend.poetry.plugin:service_maker' has the same name; rename one of them"
    )
    for find in (find_plugins, lambda: find_plugin("poetry")):
        caplog.clear()
        find()
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("WARNING", expected)]
    assert find_plugin("poetry") is service_maker


def test_the_warning_is_one_line_on_standard_error(tmp_path: Path) -> None:
    """`tend` (the listing) with a colliding drop-in prints the one line, nothing more."""
    folder = tmp_path / "tend_plugins"
    folder.mkdir()
    (folder / "impostor.py").write_text(
        "import tend\n\nclass I(tend.ServiceMaker):\n    name = 'poetry'\n\ni = I()\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "tend"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        f"tend: plugin 'poetry' in {folder / 'impostor.py'} is ignored: the installed entry "
        "point 'poetry = tend.poetry.plugin:service_maker' has the same name; rename one of them"
    ]


def test_unknown_plugin_suggests_a_close_name() -> None:
    """find_plugin('petry') is a UsageError suggesting 'poetry'."""
    with pytest.raises(UsageError) as caught:
        find_plugin("petry")

    assert str(caught.value).startswith("unknown plugin 'petry'; did you mean 'poetry'?")


def test_unknown_plugin_without_a_close_name_says_how_to_list() -> None:
    """An unknown plugin with no close match points at `tend` for the list."""
    with pytest.raises(UsageError) as caught:
        find_plugin("zzzzzz")

    assert str(caught.value) == "unknown plugin 'zzzzzz'; run 'tend' to list the plugins"


def test_unknown_plugin_mentions_a_module_that_failed_to_load(write_plugin: WritePlugin) -> None:
    """When a plugin module is broken, the unknown-plugin message names it and its error."""
    broken = write_plugin("hello.py", "raise ImportError('no module named lyre')\n")

    with pytest.raises(UsageError) as caught:
        find_plugin("hello")

    message = str(caught.value)
    assert message.startswith("unknown plugin 'hello'")
    assert f"(a plugin failed to load: {broken}: ImportError: no module named lyre)" in message


def test_a_plugin_that_calls_sys_exit_is_a_startup_error() -> None:
    """sys.exit() in make_service (at start or in a reload) is the plugin's failure, one
    line, never the end of the process that asked."""

    class Exiting(ServiceMaker):
        name = "exiting"

        def make_service(self, options: Mapping[str, object]) -> Service:
            raise SystemExit("bye")

    with pytest.raises(StartupError) as raised:
        make_service(Exiting(), {}, "deploy.toml: entry 1: ")
    assert str(raised.value) == (
        "deploy.toml: entry 1: plugin 'exiting' called sys.exit('bye') while making its service"
    )
