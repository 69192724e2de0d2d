"""Deployment files (`tend -c FILE.toml`): real runs, conversions, and every error message."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    POEM,
    Daemons,
    Tend,
    fetch,
    pid_alive,
    run_once,
    shim_proxy_plugin,
    wait_until,
)

from tend.deploy import DeploymentError, load_deployment
from tend.service import MultiService

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "deploy.toml"
TYGER = REPO / "src" / "tend" / "poetry" / "poems" / "tyger.txt"

# A plugin that records the options it was made with, to see what a deployment file gives.
RECORDER_PLUGIN = """
import json
import tend

def path_option(*args):
    return tend.Option(*args, path=True)

class Recorder(tend.Service):
    def __init__(self, options):
        super().__init__()
        self.options = dict(options)

    async def start_service(self):
        with open(self.options["record"], "w") as file:
            json.dump(self.options, file)
        await super().start_service()

class RecorderMaker(tend.ServiceMaker):
    name = "recorder"
    description = "Records its options."
    options = [
        tend.Option("record", None, "record.json", "Where to write the options."),
        tend.Option("count", "c", "3", "A number.", type=int),
        tend.Option("ratio", None, None, "A float.", type=float),
        tend.Option("label", None, None, "A string."),
        tend.Flag("loud", "l", "A flag."),
        path_option("data-file", None, None, "A path."),
        tend.Option("tag", "t", "plain", "Repeatable.", type=str.upper, repeatable=True),
    ]

    def make_service(self, options):
        return Recorder(options)

recorder = RecorderMaker()
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def ports_in(text: str, count: int) -> list[int] | None:
    """The first *count* ports logged as `starting on PORT`, once all are there."""
    ports = [int(port) for port in re.findall(r"starting on (\d+)", text)]
    return ports[:count] if len(ports) >= count else None


# -- real runs -----------------------------------------------------------------------------


def test_example_serves_two_poems_and_a_proxy_as_a_daemon(
    run_tend: Callable[..., Tend], tmp_path: Path, daemons: Daemons
) -> None:
    """examples/deploy.toml, started from elsewhere: pidfile, log and poem path beside it."""
    upstream = run_tend("--nodaemon", "--pidfile", "", "poetry", "-p", "0", "--iface", "127.0.0.1")
    upstream_port = upstream.wait_for_port()
    # The example's layout, with free ports and the proxy pointed at that upstream.
    text = EXAMPLE.read_text()
    for port in ("10000", "10001", "10002"):
        assert f"port = {port}\n" in text
        text = text.replace(f"port = {port}\n", 'port = "tcp:0:interface=127.0.0.1"\n')
    assert 'server = "localhost:10000"' in text
    text = text.replace('server = "localhost:10000"', f'server = "127.0.0.1:{upstream_port}"')
    deploy = write(tmp_path / "examples" / "deploy.toml", text)
    poems = tmp_path / "src" / "tend" / "poetry" / "poems"
    poems.mkdir(parents=True)
    shutil.copy(TYGER, poems / "tyger.txt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shim_proxy_plugin(elsewhere)

    result = run_once("-c", str(deploy), cwd=elsewhere)
    pidfile = tmp_path / "examples" / "tend.pid"
    if pidfile.exists():
        daemons.add(int(pidfile.read_text()))
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    log = tmp_path / "examples" / "tend.log"
    ports = wait_until(lambda: ports_in(log.read_text(), 3))
    assert isinstance(ports, list)
    assert fetch(ports[0]) == POEM.read_bytes()
    assert fetch(ports[1]) == TYGER.read_bytes()
    assert fetch(ports[2]) == POEM.read_bytes()  # through the proxy, from the upstream
    assert not (elsewhere / "tend.pid").exists()
    assert not (elsewhere / "tend.log").exists()

    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid))
    assert not pidfile.exists()
    assert "Server Shut Down." in log.read_text()


def test_services_are_named_children_of_one_application(tmp_path: Path) -> None:
    """Each entry becomes a child named by its `name`, or PLUGIN-N, in the file's order."""
    deploy = write(
        tmp_path / "deploy.toml",
        """\
        [[service]]
        plugin = "poetry"
        name = "ecstasy"

        [[service]]
        plugin = "poetry"
        port = 10001
        """,
    )
    application = load_deployment(str(deploy)).build()
    assert application.name == "deploy"
    children = list(application)
    assert [child.name for child in children] == ["ecstasy", "poetry-2"]
    assert all(isinstance(child, MultiService) for child in children)
    assert application.get_service_named("poetry-2") is children[1]


def test_tend_table_sets_runner_options_and_command_line_wins(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """[tend] nodaemon keeps tend in the foreground; -l - on the command line beats logfile."""
    conf = tmp_path / "conf"
    write(conf / "poems" / "short.txt", "A short poem.\n")
    deploy = write(
        conf / "deploy.toml",
        """\
        [tend]
        nodaemon = true
        pidfile = "run.pid"
        logfile = "file.log"

        [[service]]
        plugin = "poetry"
        port = 0
        iface = "127.0.0.1"
        poem = "poems/short.txt"
        """,
    )
    tend = run_tend("-l", "-", "-c", str(deploy))
    port = tend.wait_for_port()
    assert fetch(port) == b"A short poem.\n"
    assert (conf / "run.pid").read_text().strip() == str(tend.pid)
    assert not (conf / "file.log").exists()
    assert tend.stop() == 0
    assert not (conf / "run.pid").exists()


def test_tend_table_values_are_converted_and_paths_made_absolute(tmp_path: Path) -> None:
    """[tend] values arrive as the command line's would, keyed by argparse destination."""
    deploy = write(
        tmp_path / "conf" / "deploy.toml",
        """\
        [tend]
        nodaemon = true
        pidfile = "run/tend.pid"
        logfile = "/var/log/poetry.log"
        rundir = "."
        log_max_bytes = 5000
        log-backups = 3
        umask = "027"
        uid = 1000
        loop = "asyncio"
        shutdown-timeout = 2.5

        [[service]]
        plugin = "poetry"
        """,
    )
    settings = load_deployment(str(deploy)).settings
    conf = str(tmp_path / "conf")
    assert settings == {
        "nodaemon": True,
        "pidfile": os.path.join(conf, "run", "tend.pid"),
        "logfile": "/var/log/poetry.log",
        "rundir": conf,
        "log_max_bytes": 5000,
        "log_backups": 3,
        "umask": 0o027,
        "uid": "1000",
        "loop": "asyncio",
        "shutdown_timeout": 2.5,
    }


def test_an_empty_pidfile_and_logfile_dash_keep_their_meaning(tmp_path: Path) -> None:
    """pidfile = "" still means none, and logfile = "-" standard output, not file names."""
    deploy = write(
        tmp_path / "deploy.toml",
        """\
        [tend]
        pidfile = ""
        logfile = "-"

        [[service]]
        plugin = "poetry"
        """,
    )
    assert load_deployment(str(deploy)).settings == {"pidfile": "", "logfile": "-"}


def test_plugin_options_are_converted_like_the_command_line(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """TOML numbers go through the option's converter, flags take booleans, defaults apply."""
    write(tmp_path / "tend_plugins" / "recorder.py", RECORDER_PLUGIN)
    conf = tmp_path / "conf"
    deploy = write(
        conf / "deploy.toml",
        f"""\
        [[service]]
        plugin = "recorder"
        record = "{tmp_path / "first.json"}"
        ratio = 2
        label = "seven"
        loud = true
        data_file = "data/input.txt"
        tag = ["red", "green"]

        [[service]]
        plugin = "recorder"
        record = "{tmp_path / "second.json"}"
        count = 12
        ratio = 0.25
        loud = false
        tag = "blue"
        """,
    )
    tend = run_tend("--nodaemon", "--pidfile", "", "-c", str(deploy))
    tend.wait_for_output("event loop class")
    first = wait_until(lambda: _read_json(tmp_path / "first.json"))
    second = wait_until(lambda: _read_json(tmp_path / "second.json"))
    assert first == {
        "record": str(tmp_path / "first.json"),
        "count": 3,
        "ratio": 2.0,
        "label": "seven",
        "loud": True,
        "data_file": str(conf / "data" / "input.txt"),
        "tag": ["RED", "GREEN"],
    }
    assert second == {
        "record": str(tmp_path / "second.json"),
        "count": 12,
        "ratio": 0.25,
        "label": None,
        "loud": False,
        "data_file": None,
        "tag": ["BLUE"],
    }
    assert tend.stop() == 0


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# -- every error names the file, the entry and the key ---------------------------------------

ERRORS = {
    "unknown plugin": (
        """\
        [[service]]
        plugin = "petry"
        """,
        "deploy.toml: entry 1 ('petry-1'): unknown plugin 'petry'; did you mean 'poetry'?",
    ),
    "unknown option": (
        """\
        [[service]]
        plugin = "poetry"

        [[service]]
        plugin = "poetry"
        prot = 10001
        """,
        "deploy.toml: entry 2 ('poetry-2'): unknown option 'prot'; did you mean 'port'?",
    ),
    "wrong type": (
        """\
        [[service]]
        plugin = "poetry"
        name = "ecstasy"
        port = [10000, 10001]
        """,
        "deploy.toml: entry 1 ('ecstasy'): option 'port': "
        "expected a string or a number, not an array",
    ),
    "empty array for a repeatable option": (
        """\
        [[service]]
        plugin = "ftp"
        listen = []
        """,
        "deploy.toml: entry 1 ('ftp-1'): option 'listen': "
        "expected at least one value, not an empty array",
    ),
    "bad item in a repeatable option": (
        """\
        [[service]]
        plugin = "ftp"
        listen = ["2121", "unix:/tmp/x"]
        """,
        "deploy.toml: entry 1 ('ftp-1'): option 'listen': invalid endpoint 'unix:/tmp/x': "
        "FTP needs TCP (its data connections go to IP addresses) and this server has no TLS; "
        "give a port or tcp:PORT",
    ),
    "invalid value": (
        """\
        [[service]]
        plugin = "poetry"
        chunk-size = 0
        """,
        "deploy.toml: entry 1 ('poetry-1'): option 'chunk-size': "
        "invalid chunk size '0': expected a whole number of bytes, at least 1",
    ),
    "boolean for a value": (
        """\
        [[service]]
        plugin = "poetry"
        delay = true
        """,
        "deploy.toml: entry 1 ('poetry-1'): option 'delay': "
        "expected a string or a number, not the boolean true",
    ),
    "missing required option": (
        """\
        [[service]]
        plugin = "poetry-proxy"
        port = 10001
        """,
        "deploy.toml: entry 1 ('poetry-proxy-1'): "
        "missing option 'server', which plugin 'poetry-proxy' requires",
    ),
    "option given twice": (
        """\
        [[service]]
        plugin = "poetry"
        chunk-size = 10
        chunk_size = 20
        """,
        "deploy.toml: entry 1 ('poetry-1'): option 'chunk-size' is given twice, "
        "as 'chunk-size' and as 'chunk_size'",
    ),
    "no plugin": (
        """\
        [[service]]
        port = 10000
        """,
        'deploy.toml: entry 1: no plugin given; name one, as plugin = "poetry"',
    ),
    "duplicate name": (
        """\
        [[service]]
        plugin = "poetry"
        name = "poems"

        [[service]]
        plugin = "poetry"
        name = "poems"
        """,
        "deploy.toml: entry 2 ('poems'): the name 'poems' is already used by entry 1; "
        "give each service its own name",
    ),
    "empty name": (
        """\
        [[service]]
        plugin = "poetry"
        name = ""
        """,
        "deploy.toml: entry 1 (''): 'name' must be a non-empty string, not the string ''",
    ),
    "syntax error": (
        """\
        [tend]
        nodaemon = true

        [[service]]
        plugin = "poetry"
        port = = 10000
        """,
        "deploy.toml: line 6: TOML syntax error: invalid value (column 8)",
    ),
    "syntax error at the end": (
        """\
        [[service]]
        plugin = "poetry"
        port = [10000,
        """,
        "deploy.toml: end of file: TOML syntax error: invalid value",
    ),
    "unknown runner option": (
        """\
        [tend]
        pidfil = "poetry.pid"

        [[service]]
        plugin = "poetry"
        """,
        "deploy.toml: [tend]: unknown option 'pidfil'; did you mean 'pidfile'?",
    ),
    "runner flag not a boolean": (
        """\
        [tend]
        nodaemon = "yes"

        [[service]]
        plugin = "poetry"
        """,
        "deploy.toml: [tend]: option 'nodaemon': expected true or false, not the string 'yes'",
    ),
    "runner value rejected": (
        """\
        [tend]
        log-max-bytes = -1

        [[service]]
        plugin = "poetry"
        """,
        "deploy.toml: [tend]: option 'log-max-bytes': invalid count '-1': expected a whole number",
    ),
    "runner choice": (
        """\
        [tend]
        loop = "trio"

        [[service]]
        plugin = "poetry"
        """,
        "deploy.toml: [tend]: option 'loop': expected one of auto, asyncio, uvloop, not 'trio'",
    ),
    "umask as a number": (
        """\
        [tend]
        umask = 0o022

        [[service]]
        plugin = "poetry"
        """,
        "deploy.toml: [tend]: option 'umask': write the umask as a string, as umask = \"022\"",
    ),
    "tend not a table": (
        """\
        tend = "yes"

        [[service]]
        plugin = "poetry"
        """,
        "deploy.toml: 'tend' must be a table: write [tend] above the runner options",
    ),
    "unknown table": (
        """\
        [tnd]
        nodaemon = true
        """,
        "deploy.toml: unknown table 'tnd'; did you mean 'tend'?",
    ),
    "a runner option outside [tend]": (
        """\
        nodaemon = true

        [[service]]
        plugin = "poetry"
        """,
        "deploy.toml: unknown key 'nodaemon'; "
        "runner options go under [tend], services under [[service]]",
    ),
    "single brackets": (
        """\
        [service]
        plugin = "poetry"
        """,
        "deploy.toml: 'service' must be an array of tables: write [[service]], not [service]",
    ),
    "no services": (
        """\
        [tend]
        nodaemon = true
        """,
        'deploy.toml: lists no services; add a [[service]] table with plugin = "NAME"',
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_each_error_names_the_file_the_entry_and_the_key(tmp_path: Path, case: str) -> None:
    """A mistake in the file is one line on stderr, exit 1, and nothing left behind."""
    text, message = ERRORS[case]
    write(tmp_path / "deploy.toml", text)
    shim_proxy_plugin(tmp_path)
    result = run_once("-c", "deploy.toml", cwd=tmp_path)
    assert (result.returncode, result.stderr, result.stdout) == (1, f"tend: {message}\n", "")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["deploy.toml", *(["tend_plugins"] if (tmp_path / "tend_plugins").exists() else [])]
    )


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    """A file that cannot be read is reported with the path as given."""
    result = run_once("--config", "missing.toml", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (
        1,
        "tend: cannot read deployment file 'missing.toml': No such file or directory\n",
    )


def test_text_that_is_not_utf8_is_named_by_line(tmp_path: Path) -> None:
    """A byte that is not UTF-8 is reported with its line."""
    (tmp_path / "deploy.toml").write_bytes(b'[[service]]\nplugin = "po\xffetry"\n')
    with pytest.raises(DeploymentError) as caught:
        load_deployment(str(tmp_path / "deploy.toml"))
    assert str(caught.value).endswith("deploy.toml: line 2: not UTF-8 text")


def test_a_file_outside_the_current_folder_is_named_by_its_full_path(tmp_path: Path) -> None:
    """The file is named as it is below the current folder, and in full elsewhere."""
    deploy = write(tmp_path / "deploy.toml", "[tnd]\n")
    with pytest.raises(DeploymentError) as caught:
        load_deployment(str(deploy))
    relative = os.path.relpath(deploy)
    shown = str(deploy) if relative.startswith("..") else relative
    assert str(caught.value) == f"{shown}: unknown table 'tnd'; did you mean 'tend'?"


def test_a_plugin_that_fails_to_make_its_service_names_the_entry(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """An exception in make_service is a start failure naming the entry; the log has it all."""
    write(
        tmp_path / "tend_plugins" / "broken.py",
        """\
        import tend

        class Broken(tend.ServiceMaker):
            name = "broken"
            def make_service(self, options):
                raise RuntimeError("no luck")

        broken = Broken()
        """,
    )
    write(tmp_path / "deploy.toml", '[[service]]\nplugin = "broken"\nname = "b"\n')
    tend = run_tend("--nodaemon", "--pidfile", "", "-c", "deploy.toml")
    assert tend.wait() == 1
    assert tend.stderr == (
        "tend: deploy.toml: entry 1 ('b'): plugin 'broken' failed to make its service: "
        "RuntimeError: no luck (the traceback is in the log)\n"
    )
    assert "Traceback" in tend.stdout


CLASHES = {
    "same port": ("port = 10300", "port = 10300", "localhost:10300"),
    "same endpoint": ('port = "tcp:10300"', 'port = "tcp:10300"', "localhost:10300"),
    "a wildcard and one interface": (
        'port = "tcp:10300:interface=0.0.0.0"',
        'port = "tcp:10300:interface=127.0.0.1"',
        "127.0.0.1:10300",
    ),
}


@pytest.mark.parametrize("case", list(CLASHES))
def test_two_entries_on_one_port_are_both_named(tmp_path: Path, case: str) -> None:
    """Two entries that would listen on the same address: one line naming both, and where."""
    first, second, where = CLASHES[case]
    write(
        tmp_path / "deploy.toml",
        f'[[service]]\nplugin = "poetry"\nname = "ecstasy"\n{first}\n'
        f'[[service]]\nplugin = "poetry"\nname = "tyger"\n{second}\n',
    )
    with pytest.raises(DeploymentError) as caught:
        load_deployment(str(tmp_path / "deploy.toml")).build()
    assert str(caught.value).endswith(
        f"deploy.toml: entry 1 ('ecstasy') and entry 2 ('tyger') both listen on {where}; "
        "give each entry its own port"
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("port = 0", "port = 0"),
        ("port = 10300", "port = 10301"),
        ('port = "tcp:10300:reusePort=yes"', 'port = "tcp:10300:reusePort=yes"'),
        ('port = "tcp:10300:interface=127.0.0.1"', 'port = "tcp:10300:interface=127.0.0.2"'),
    ],
)
def test_entries_that_can_share_are_not_called_a_clash(
    tmp_path: Path, first: str, second: str
) -> None:
    """Port 0, other ports, SO_REUSEPORT on both, other interfaces: no clash is claimed."""
    write(
        tmp_path / "deploy.toml",
        f'[[service]]\nplugin = "poetry"\n{first}\n[[service]]\nplugin = "poetry"\n{second}\n',
    )
    assert len(list(load_deployment(str(tmp_path / "deploy.toml")).build())) == 2


def test_a_port_clash_is_one_line_before_anything_listens(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """tend -c with two entries on one port exits 1 with the line naming both."""
    write(
        tmp_path / "deploy.toml",
        '[[service]]\nplugin = "poetry"\nname = "ecstasy"\nport = 10300\n'
        '[[service]]\nplugin = "poetry"\nname = "tyger"\nport = 10300\n',
    )
    tend = run_tend("--nodaemon", "--pidfile", "", "-c", "deploy.toml")
    assert tend.wait() == 1
    assert tend.stderr == (
        "tend: deploy.toml: entry 1 ('ecstasy') and entry 2 ('tyger') both listen on "
        "localhost:10300; give each entry its own port\n"
    )
    assert "starting on" not in tend.stdout
