"""Run the torture suite, print its table of figures, and exit non-zero on any failure.

    .venv/bin/python tests/torture/run.py            # the full form (make torture)
    .venv/bin/python tests/torture/run.py --short    # the short form (make torture-short)

Any other arguments go to pytest (``-k endpoint``, ``-x``). The table (cases tried and
kept by kind, faults survived, security checks and properties held, RSS and descriptors
before and after) is printed by tests/torture/conftest.py at the end of the run; the
failing cases, each with its command and what went wrong, are listed above it, and a
JUnit report is left in build/torture.xml.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parents[1]


def main(arguments: list[str]) -> int:
    short = "--short" in arguments
    passed = [argument for argument in arguments if argument != "--short"]
    environment = dict(os.environ, TORTURE="short" if short else "full")
    (TOP / "build").mkdir(exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE),
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfEs",
        f"--junitxml={TOP / 'build' / 'torture.xml'}",
        *passed,
    ]
    return subprocess.run(command, cwd=TOP, env=environment, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
