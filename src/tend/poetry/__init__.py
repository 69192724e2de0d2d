"""The fast poetry server, its client and proxy: tend's flagship application.

Built only on tend's public API (``from tend import ...``), to prove that API is enough.
"""

from __future__ import annotations

import os

POEMS = os.path.join(os.path.dirname(__file__), "poems")
DEFAULT_POEM = os.path.join(POEMS, "ecstasy.txt")
