"""Every enumerated bad input is refused as promised: status, one line, 2 s, nothing left.

The full form runs every case in cases.py; the short form (in `make test`) a few of each
kind. Each case runs the real command in a folder of its own (see harness.run_case).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torture.cases import all_cases, sample
from torture.conftest import FULL, record
from torture.harness import run_case

CASES = all_cases()
CHOSEN = CASES if FULL else sample(CASES)


def test_enough_cases_are_enumerated() -> None:
    """The full form tries at least 400 bad inputs, of every kind the issue lists."""
    assert len(CASES) >= 400
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", CHOSEN, ids=[case.id for case in CHOSEN])
def test_bad_input_is_refused_as_promised(case, pki: Path, request: pytest.FixtureRequest) -> None:
    """The command exits 2 or 1 with one short line, in 2 s, leaving nothing behind."""
    record(request, "bad input", case.kind)
    if case.root_only and os.geteuid() != 0:
        pytest.skip("needs root to switch users or chroot")
    outcome = run_case(case, pki)
    if outcome.problems:
        pytest.fail(f"{case.id}\n{outcome.report()}", pytrace=False)
