"""Properties, with hypothesis: the parsers fail only with tend's own errors, in one short line.

- the endpoint parser, on any text: an endpoint whose numbers the kernel takes, or
  ``EndpointSyntaxError``;
- the deployment loader, on TOML documents built from strategies and on arbitrary bytes:
  a checked deployment (whose tree builds), or a ``TendError``;
- the command line (``command_parser``, ``settings.resolve``, a plugin's options and the
  tree they build), on any list of options: settings, or a ``TendError``, or argparse's
  ``SystemExit(2)`` with one line on standard error. Nothing is started.

The short form runs a few hundred examples each, derandomized; the full form thousands.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tend
from tend.errors import TendError
from torture.conftest import FULL, record
from torture.harness import HELP_LINE, LINE_LIMIT, control_characters

settings.load_profile("torture-full" if FULL else "torture-short")
# The promise's line is "tend: " or "tend poetry: error: argument -p/--port: " and the message.
PREFIX = len("tend poetry: error: argument -p/--port: ")

pytestmark = pytest.mark.timeout(3600 if FULL else 300)


def one_line_problems(message: str, limit: int = LINE_LIMIT) -> list[str]:
    problems = []
    if "\n" in message or "\r" in message:
        problems.append("more than one line")
    if len(message) > limit:
        problems.append(f"{len(message)} characters, over {limit}")
    if control_characters(message):
        problems.append("control characters")
    return problems


# -- strategies -------------------------------------------------------------------------------

odd_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40
)
numbers = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["0", "1", "65535", "65536", "2147483647", "2147483648", "0777", "8"]),
    st.sampled_from(["\u0661", "\u00b2", "\u0663\u0663", "1_0", " 1", "1e3", "nan", "-0"]),
)
values = st.one_of(numbers, odd_text, st.just(""), st.just("yes"), st.just("\\:\\:1"))
endpoint_keys = st.sampled_from(
    [
        "port",
        "interface",
        "backlog",
        "reusePort",
        "mode",
        "certKey",
        "privateKey",
        "index",
        "name",
        "domain",
        "address",
        "Port",
        "",
        "x",
    ]
)
endpoint_kinds = st.sampled_from(["tcp", "unix", "tls", "ssl", "systemd", "TCP", "Unix", "x", ""])


@st.composite
def descriptions(draw: st.DrawFn) -> str:
    kind = draw(endpoint_kinds)
    fields = [kind]
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            fields.append(draw(values))
        else:
            fields.append(f"{draw(endpoint_keys)}={draw(values)}")
    return ":".join(fields)


endpoint_texts = st.one_of(st.text(max_size=60), descriptions(), numbers)


# -- the endpoint parser ----------------------------------------------------------------------


@given(endpoint_texts)
def test_endpoint_parser_returns_an_endpoint_or_raises_syntax_error(text: str) -> None:
    """parse_endpoint on any text returns an endpoint or raises EndpointSyntaxError, only."""
    try:
        endpoint = tend.parse_endpoint(text)
    except tend.EndpointSyntaxError:
        return
    assert type(endpoint).__name__ in (
        "TCPEndpoint",
        "UNIXEndpoint",
        "TLSEndpoint",
        "SystemdEndpoint",
    )


@given(endpoint_texts)
def test_parsed_endpoint_numbers_fit_the_kernel(text: str) -> None:
    """A parsed port, backlog, mode or index is one the kernel takes (no overflow at listen)."""
    try:
        endpoint = tend.parse_endpoint(text)
    except tend.EndpointSyntaxError:
        return
    port = getattr(endpoint, "port", 0)
    assert 0 <= port <= 65535, endpoint
    assert 1 <= endpoint.backlog <= 2**31 - 1, endpoint
    mode = getattr(endpoint, "mode", None)
    assert mode is None or 0 <= mode <= 0o7777, endpoint
    index = getattr(endpoint, "index", None)
    assert index is None or 0 <= index < 2**31, endpoint


@given(endpoint_texts)
def test_endpoint_syntax_error_is_one_short_line(text: str) -> None:
    """An EndpointSyntaxError reads as one line that fits the promise once prefixed."""
    try:
        tend.parse_endpoint(text)
    except tend.EndpointSyntaxError as error:
        problems = one_line_problems(str(error), LINE_LIMIT - PREFIX)
    else:
        problems = []
    assert not problems, problems


# -- the deployment loader --------------------------------------------------------------------

SETTING_KEYS = [
    "nodaemon",
    "pidfile",
    "logfile",
    "log-max-bytes",
    "log-backups",
    "log-format",
    "log-level",
    "syslog",
    "prefix",
    "syslog-facility",
    "syslog-address",
    "uid",
    "gid",
    "umask",
    "rundir",
    "chroot",
    "loop",
    "shutdown-timeout",
    "workers",
    "log_max_bytes",
    "bogus",
]
PLUGIN_KEYS = [
    "plugin",
    "name",
    "port",
    "iface",
    "poem",
    "chunk-size",
    "chunk_size",
    "delay",
    "server",
    "timeout",
    "cache-ttl",
    "prot",
]


def toml_string(text: str) -> str:
    out = []
    for character in text:
        code = ord(character)
        if character in '"\\':
            out.append("\\" + character)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(character)
    return '"' + "".join(out) + '"'


def toml_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


toml_scalars = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=30).map(toml_string),
    st.sampled_from(
        ["poetry", "poetry-proxy", "tcp:0", "text", "json", "auto", "022", "nobody"]
    ).map(toml_string),
    st.integers(-(2**64), 2**64).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(toml_float),
    st.booleans().map(lambda value: "true" if value else "false"),
    st.sampled_from(["1979-05-27T07:32:00Z", "1979-05-27", "07:32:00", "1979-05-27T07:32:00"]),
    # What no hand-written file holds, but a file from anywhere may: huge and deep values.
    st.sampled_from(["1" * 5000, "[" * 3000 + "]" * 3000, "0." + "1" * 5000, "1e99999"]),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
        st.dictionaries(st.sampled_from(["a", "b", "port"]), inner, max_size=2).map(
            lambda table: "{" + ", ".join(f"{k} = {v}" for k, v in table.items()) + "}"
        ),
    ),
    max_leaves=6,
)


@st.composite
def deployment_documents(draw: st.DrawFn) -> str:
    lines = []
    if draw(st.booleans()):
        lines.append("[tend]")
        keys = draw(st.lists(st.sampled_from(SETTING_KEYS), max_size=4, unique=True))
        lines += [f"{toml_string(key)} = {draw(toml_values)}" for key in keys]
    for _ in range(draw(st.integers(0, 3))):
        lines.append("[[service]]")
        if draw(st.integers(0, 4)):
            plugin = draw(st.sampled_from(["poetry", "poetry-proxy", "petry", ""]))
            lines.append(f"plugin = {toml_string(plugin)}")
        keys = draw(st.lists(st.sampled_from(PLUGIN_KEYS[1:]), max_size=4, unique=True))
        lines += [f"{toml_string(key)} = {draw(toml_values)}" for key in keys]
    if draw(st.integers(0, 9)) == 0:
        lines.append(f"{toml_string(draw(st.text(max_size=10)))} = {draw(toml_values)}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def deployment_file(data: bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hyp", dir="/tmp") as folder:
        path = Path(folder) / "deploy.toml"
        path.write_bytes(data)
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            yield path
        finally:
            os.chdir(cwd)


def load_and_build(data: bytes) -> TendError | None:
    """Load (and build) a deployment; return its TendError, None if it loaded."""
    from tend.deploy import load_deployment

    with deployment_file(data) as path:
        try:
            deployment = load_deployment(str(path))
            deployment.build()
        except TendError as error:
            return error
    return None


def mutated(document: str, edits: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(document.encode())
    for position, piece in edits:
        at = position % (len(data) + 1)
        data[at : at + len(piece)] = piece
    return bytes(data)


byte_documents = st.one_of(
    st.binary(max_size=200),
    st.builds(
        mutated,
        deployment_documents(),
        st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=3)), max_size=3),
    ),
)


@given(deployment_documents())
def test_deployment_loader_raises_only_tend_errors_on_documents(document: str) -> None:
    """load_deployment (and the build) on a TOML document: a deployment or a TendError."""
    load_and_build(document.encode())


@given(byte_documents)
def test_deployment_loader_raises_only_tend_errors_on_bytes(data: bytes) -> None:
    """load_deployment on arbitrary bytes: a deployment or a TendError, nothing else."""
    load_and_build(data)


@given(st.one_of(deployment_documents().map(str.encode), byte_documents))
def test_deployment_error_is_one_short_line(data: bytes) -> None:
    """A deployment file's error is one line of at most 200 characters, once prefixed."""
    error = load_and_build(data)
    if error is not None:
        assert not one_line_problems(f"tend: {error}"), repr(str(error))


# -- the command line -------------------------------------------------------------------------

RUNNER_OPTIONS = [
    "--nodaemon",
    "-n",
    "--no-nodaemon",
    "--pidfile",
    "-l",
    "--logfile",
    "--log-max-bytes",
    "--log-backups",
    "--log-format",
    "--log-level",
    "--syslog",
    "--no-syslog",
    "--prefix",
    "--syslog-facility",
    "--syslog-address",
    "-u",
    "--uid",
    "-g",
    "--gid",
    "--umask",
    "-d",
    "--rundir",
    "--chroot",
    "--loop",
    "--shutdown-timeout",
    "--workers",
    "--pid",
    "--work",
]
PLUGIN_OPTIONS = [
    "--port",
    "-p",
    "--iface",
    "--poem",
    "--chunk-size",
    "--delay",
    "--server",
    "--timeout",
    "--cache-ttl",
]
tokens = st.one_of(
    st.sampled_from(RUNNER_OPTIONS),
    values,
    st.sampled_from(["-", "--", "-x", "--bogus", "--log-max-bytes=1", "--pidfile="]),
)


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    line = draw(st.lists(tokens, max_size=8))
    if draw(st.booleans()):
        line.append(draw(st.sampled_from(["poetry", "poetry-proxy", "petry"])))
        for _ in range(draw(st.integers(0, 4))):
            line.append(draw(st.sampled_from(PLUGIN_OPTIONS)))
            if draw(st.integers(0, 5)):
                line.append(draw(st.one_of(values, descriptions())))
    return line


def parse_command_line(arguments: list[str]) -> list[str]:
    """What `tend` does with *arguments* short of running: parse, resolve, build the tree.

    Returns what went wrong with the promise; raises anything unexpected.
    """
    from tend.cli import command_parser
    from tend.settings import SETTINGS, resolve
    from tend.sources import PluginSource

    stderr = io.StringIO()
    problems: list[str] = []
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parsed = command_parser().parse_args(arguments)
            given_values = {option.key: getattr(parsed, option.key) for option in SETTINGS}
            resolve(given_values, {}, "/tmp")
            if parsed.plugin is not None and not (parsed.python or parsed.config):
                source = PluginSource(parsed.plugin, parsed.plugin_arguments)
                source.check()
                source.build()
    except SystemExit as exit_:
        if exit_.code != 2:
            problems.append(f"SystemExit({exit_.code!r}), not 2")
        lines = stderr.getvalue().splitlines()
        others = [line for line in lines if not HELP_LINE.fullmatch(line)]
        if len(others) != 1:
            problems.append(f"{len(others)} lines on standard error: {lines[:3]!r}")
        for line in others:
            problems += one_line_problems(line)
    except TendError as error:
        problems += one_line_problems(f"tend: {error}")
    return problems


def no_help(arguments: list[str]) -> bool:
    return not any(token in ("-h", "--help", "--version") for token in arguments)


@given(command_lines().filter(no_help))
def test_command_line_fails_only_with_usage_or_tend_errors(arguments: list[str]) -> None:
    """Parsing, resolving and building raise only TendError or SystemExit."""
    parse_command_line(arguments)


@given(command_lines().filter(no_help))
def test_command_line_error_is_one_line_and_status_2(arguments: list[str]) -> None:
    """A command-line error is SystemExit(2) (or a TendError) with one short line."""
    problems = parse_command_line(arguments)
    assert not problems, problems


@pytest.fixture(autouse=True)
def _record(request: pytest.FixtureRequest) -> None:
    record(request, "property", request.node.name)
