"""``python -m tend``: the same as the ``tend`` command."""

from tend.cli import main

main()
