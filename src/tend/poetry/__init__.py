"""The fast poetry server, its client and proxy: tend's flagship application.

Built only on tend's public API (``from tend import ...``), to prove that API is enough.
The client is a library call too: ``poem = await tend.poetry.get_poetry(host, port)``.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tend.poetry.client import PoetryError, get_poetry

POEMS = os.path.join(os.path.dirname(__file__), "poems")
DEFAULT_POEM = os.path.join(POEMS, "ecstasy.txt")

# Imported on first use, so that listing plugins does not pay for the client.
_HOMES = {"PoetryError": "tend.poetry.client", "get_poetry": "tend.poetry.client"}

__all__ = ["DEFAULT_POEM", "POEMS", "PoetryError", "get_poetry"]


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tend.poetry' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
