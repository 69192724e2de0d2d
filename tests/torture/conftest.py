"""The torture suite's modes, its shared fixtures, and the table of figures it prints.

Two forms: the short one (the default, which `make test` runs: a sample of the enumerated
cases, hypothesis at a few hundred examples, derandomized, and the scenarios at a small
scale) and the full one (``TORTURE=full``, which `make torture` sets: every case,
thousands of examples, the scenarios at full scale). Each test records what it checked in
its ``user_properties`` under ``"torture"``; `pytest_terminal_summary` adds them up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from torture.harness import Background

FULL = os.environ.get("TORTURE") == "full"

_QUIET = [
    HealthCheck.too_slow,
    HealthCheck.function_scoped_fixture,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
    HealthCheck.filter_too_much,
]
settings.register_profile(
    "torture-short",
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=_QUIET,
)
settings.register_profile(
    "torture-full",
    max_examples=3000,
    derandomize=False,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=_QUIET,
)


def scale(short: float, full: float) -> float:
    """A size or duration: *full* under ``make torture``, *short* otherwise."""
    return full if FULL else short


def record(request: pytest.FixtureRequest, group: str, label: str, **figures: object) -> None:
    """Note what this test checks (and any figures), for the table at the end."""
    request.node.user_properties.append(("torture", (group, label, figures)))


def figure(request: pytest.FixtureRequest, name: str, value: object) -> None:
    """Note a figure (an RSS, a count) for the table, even if the test then fails."""
    request.node.user_properties.append(("torture-figure", (name, value)))


@contextlib.contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A short folder under /tmp that everyone may read (so that a dropped user can read
    what the test puts there only if the test lets it), unmounting its ``disk`` at the end.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(folder, 0o755)
    try:
        yield folder
    finally:
        if (folder / "disk").is_mount():
            subprocess.run(["umount", "-l", str(folder / "disk")], capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def background() -> Iterator[list[Background]]:
    """The test's Background processes, each killed at the end."""
    started: list[Background] = []
    yield started
    for handle in started:
        handle.kill()


@pytest.fixture(scope="session")
def pki() -> Iterator[Path]:
    """A folder of PEM files: a certificate and its key, another key, an encrypted key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl (make system-tools installs it)")
    folder = Path(tempfile.mkdtemp(prefix="pki", dir="/tmp"))
    try:

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")
        openssl(
            "req",
            "-x509",
            *ec,
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        )
        openssl(
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-out",
            "other-key.pem",
        )
        openssl(
            "pkey",
            "-in",
            "key.pem",
            "-aes256",
            "-passout",
            "pass:secret",
            "-out",
            "encrypted-key.pem",
        )
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- the table of figures ----------------------------------------------------------------------

_results: dict[str, dict[str, object]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "figures": {}})
    for key, value in report.user_properties:
        if key == "torture":
            group, label, figures = value
            entry["group"], entry["label"] = group, label
            entry["figures"].update(figures)  # type: ignore[attr-defined]
        elif key == "torture-figure":
            name, number = value
            entry["figures"][name] = number  # type: ignore[index]
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] != "failed":
        entry["outcome"] = "skipped"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    recorded = [entry for entry in _results.values() if "group" in entry]
    if not recorded:
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"torture figures ({'full' if FULL else 'short'} form)")
    groups: dict[str, dict[str, list[int]]] = {}
    for entry in recorded:
        group = str(entry["group"])
        label = str(entry["label"]) if group == "bad input" else group
        counts = groups.setdefault(group, {}).setdefault(label, [0, 0, 0])
        counts[0] += entry["outcome"] != "skipped"
        counts[1] += entry["outcome"] == "passed"
        counts[2] += entry["outcome"] == "skipped"
    bad = groups.pop("bad input", {})
    if bad:
        write(f"{'bad inputs, by kind':<28}{'tried':>7}{'kept':>7}{'failed':>8}{'skipped':>9}")
        totals = [0, 0, 0]
        for kind in sorted(bad):
            tried, kept, skipped = bad[kind]
            totals = [totals[0] + tried, totals[1] + kept, totals[2] + skipped]
            write(f"  {kind:<26}{tried:>7}{kept:>7}{tried - kept:>8}{skipped:>9}")
        tried, kept, skipped = totals
        write(f"  {'all kinds':<26}{tried:>7}{kept:>7}{tried - kept:>8}{skipped:>9}")
    names = {
        "fault": "faults survived",
        "security": "security checks held",
        "property": "properties held",
    }
    for group, labels in sorted(groups.items()):
        tried = sum(counts[0] for counts in labels.values())
        kept = sum(counts[1] for counts in labels.values())
        skipped = sum(counts[2] for counts in labels.values())
        write(
            f"{names.get(group, group)}: {kept} of {tried}"
            + (f" ({skipped} skipped)" if skipped else "")
        )
        for entry in recorded:
            if entry["group"] == group:
                mark = {"passed": "ok  ", "failed": "FAIL", "skipped": "skip"}[
                    str(entry["outcome"])
                ]
                write(f"  {mark} {entry['label']}")
    figures = [(entry["label"], entry["figures"]) for entry in recorded if entry["figures"]]
    if figures:
        write("figures:")
        for label, values in figures:
            shown = ", ".join(f"{name} {value}" for name, value in values.items())  # type: ignore[attr-defined]
            write(f"  {label}: {shown}")
