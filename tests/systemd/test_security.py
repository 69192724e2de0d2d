"""`systemd-analyze security` on the shipped service unit, and the README's figure for it."""

from __future__ import annotations

import re

from .conftest import REPO, SERVICE, Systemd

GOOD_ENOUGH = ("OK", "SAFE", "PERFECT")


def test_the_shipped_unit_rates_ok_or_better_as_the_readme_says(systemd: Systemd) -> None:
    """The exposure score is "OK" or better, and the README quotes it exactly."""
    systemd.install_shipped()
    systemd.reload()
    report = systemd.machine.run(
        "systemd-analyze", "security", "--no-pager", SERVICE, check=False
    ).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", report)
    assert match is not None, report
    score, level = match.groups()
    assert level in GOOD_ENOUGH, report
    readme = (REPO / "README.md").read_text()
    assert f'rates the unit "{score} {level}"' in readme, f"measured {score} {level}"
