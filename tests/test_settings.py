"""Tests for tend.settings: one table makes the command line, [tend] and the typed settings."""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Tend, fetch

from tend.cli import command_parser
from tend.deploy import load_deployment
from tend.errors import UsageError
from tend.options import Flag
from tend.settings import SETTINGS, resolve


def parsed_settings(*arguments: str) -> dict[str, object]:
    parsed = command_parser().parse_args([*arguments, "poetry"])
    return {option.key: getattr(parsed, option.key) for option in SETTINGS}


def write_deployment(folder: Path, tend_table: str) -> Path:
    path = folder / "deploy.toml"
    path.write_text(
        textwrap.dedent(tend_table) + '\n[[service]]\nplugin = "poetry"\n', encoding="utf-8"
    )
    return path


def test_every_setting_is_an_option_and_a_tend_key(tmp_path: Path) -> None:
    """Each row of the table is a command-line option and a key [tend] accepts."""
    words = set(command_parser().format_help().replace(",", " ").split())
    for option in SETTINGS:
        assert f"--{option.long}" in words
        if isinstance(option, Flag):
            assert f"--no-{option.long}" in words
    table = "[tend]\n" + "".join(
        f"{option.long} = true\n" for option in SETTINGS if isinstance(option, Flag)
    )
    settings = load_deployment(str(write_deployment(tmp_path, table))).settings
    assert settings == {option.key: True for option in SETTINGS if isinstance(option, Flag)}


def test_defaults_come_from_the_table_typed() -> None:
    """With nothing given, the settings hold the table's defaults, already converted."""
    settings = resolve(parsed_settings("--nodaemon"), {}, "/srv")
    assert settings.log.max_bytes == 1_000_000
    assert settings.shutdown_timeout == 10.0
    assert settings.workers == 1
    assert settings.loop == "auto"
    assert settings.log.level == 20
    assert settings.pidfile == "/srv/tend.pid"
    assert settings.log.logfile is None


def test_command_line_wins_over_the_file_and_a_switch_turns_off(tmp_path: Path) -> None:
    """--no-nodaemon turns off nodaemon = true from [tend]; other values merge."""
    deployment = load_deployment(
        str(
            write_deployment(
                tmp_path, '[tend]\nnodaemon = true\nshutdown-timeout = 3\nlog-level = "error"\n'
            )
        )
    )
    settings = resolve(
        parsed_settings("--no-nodaemon", "--log-level", "debug"), deployment.settings, "/srv"
    )
    assert settings.nodaemon is False
    assert settings.shutdown_timeout == 3.0
    assert settings.log.level == 10
    assert settings.log.logfile == "/srv/tend.log"


def test_numbers_from_the_file_are_never_turned_back_into_text(tmp_path: Path) -> None:
    """A [tend] number arrives as the type the option makes, not as text."""
    deployment = load_deployment(
        str(write_deployment(tmp_path, "[tend]\nlog-max-bytes = 5000\nworkers = 2\n"))
    )
    assert deployment.settings == {"log_max_bytes": 5000, "workers": 2}
    settings = resolve(parsed_settings(), deployment.settings, "/srv")
    assert (settings.log.max_bytes, settings.workers) == (5000, 2)


def test_a_dash_pidfile_is_a_usage_error() -> None:
    """'-' means standard output for the log only; as a pidfile it is refused."""
    with pytest.raises(UsageError, match="'-' is not a pidfile"):
        parsed_settings("--pidfile", "-")


def test_help_shows_each_default_from_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints each option's default, taken from the table."""
    with pytest.raises(SystemExit):
        command_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "0 never (default: 1000000)" in out
    assert "--nodaemon, --no-nodaemon" in out
    assert "--log-level {debug,info,warning,error,critical}" in out


def test_bad_value_names_the_option() -> None:
    """A value the table's converter rejects is argparse's error naming the option."""
    parser = command_parser()
    parser.exit_on_error = False
    with pytest.raises(argparse.ArgumentError, match="invalid worker count '0'"):
        parser.parse_args(["--workers", "0", "poetry"])


def test_log_level_silences_lower_records(run_tend: Callable[..., Tend], tmp_path: Path) -> None:
    """--log-level warning keeps the info lines out, warnings still come."""
    tend = run_tend(
        "--nodaemon",
        "--pidfile=",
        "--log-level",
        "warning",
        "poetry",
        "--port",
        "tcp:0:interface=127.0.0.1",
        "--poem",
        str(tmp_path / "missing.txt"),
    )
    assert tend.wait() == 1
    assert "starting up" not in tend.stdout
    assert "cannot read poem file" in tend.stderr


def test_no_nodaemon_on_the_command_line_detaches(
    run_tend: Callable[..., Tend], tmp_path: Path, daemons: list[int]
) -> None:
    """A deployment file's nodaemon = true is switched off by --no-nodaemon."""
    poem = tmp_path / "poem.txt"
    poem.write_text("A short poem.\n")
    deploy = write_deployment(tmp_path, "[tend]\nnodaemon = true\n")
    deploy.write_text(
        deploy.read_text().replace(
            'plugin = "poetry"\n',
            f'plugin = "poetry"\nport = 0\niface = "127.0.0.1"\npoem = "{poem}"\n',
        )
    )
    tend = run_tend("--no-nodaemon", "-c", str(deploy))
    assert tend.wait() == 0
    pid = int((tmp_path / "tend.pid").read_text())
    daemons.append(pid)
    port = int(
        Tend.wait_for_output(tend, r"starting on (\d+)", source=str(tmp_path / "tend.log")).group(1)
    )
    assert fetch(port) == b"A short poem.\n"
    os.kill(pid, 15)
