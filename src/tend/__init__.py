"""tend: run asyncio network services the way a production Unix service should run.

The public API is what ``__all__`` lists. Names are imported on first use, so that
``tend --help`` and plugin listing do not pay for asyncio and the network code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

if TYPE_CHECKING:
    from tend.addresses import format_address, host_and_port
    from tend.endpoints import EndpointSyntaxError, endpoint_text, parse_endpoint
    from tend.errors import StartupError, TendError, UsageError, quote
    from tend.files import read_file
    from tend.logs.access import AccessLog
    from tend.net import (
        StreamServer,
        TCPServer,
        UNIXServer,
        arm_reset,
        close_cleanly,
        reset,
    )
    from tend.options import CommandParser, Flag, Option, positive_seconds, seconds
    from tend.plugins import ServiceMaker
    from tend.service import Application, MultiService, Service, walk
    from tend.worker import current_worker

_HOMES = {
    "Application": "tend.service",
    "MultiService": "tend.service",
    "Service": "tend.service",
    "walk": "tend.service",
    "StreamServer": "tend.net",
    "TCPServer": "tend.net",
    "UNIXServer": "tend.net",
    "reset": "tend.net",
    "arm_reset": "tend.net",
    "close_cleanly": "tend.net",
    "EndpointSyntaxError": "tend.endpoints",
    "format_address": "tend.addresses",
    "host_and_port": "tend.addresses",
    "parse_endpoint": "tend.endpoints",
    "endpoint_text": "tend.endpoints",
    "CommandParser": "tend.options",
    "Flag": "tend.options",
    "read_file": "tend.files",
    "Option": "tend.options",
    "positive_seconds": "tend.options",
    "seconds": "tend.options",
    "ServiceMaker": "tend.plugins",
    "StartupError": "tend.errors",
    "TendError": "tend.errors",
    "UsageError": "tend.errors",
    "quote": "tend.errors",
    "AccessLog": "tend.logs.access",
    "current_worker": "tend.worker",
}

__all__ = [
    "AccessLog",
    "Application",
    "CommandParser",
    "EndpointSyntaxError",
    "Flag",
    "MultiService",
    "Option",
    "Service",
    "ServiceMaker",
    "StartupError",
    "StreamServer",
    "TCPServer",
    "TendError",
    "UNIXServer",
    "UsageError",
    "__version__",
    "arm_reset",
    "close_cleanly",
    "current_worker",
    "endpoint_text",
    "format_address",
    "host_and_port",
    "parse_endpoint",
    "positive_seconds",
    "quote",
    "read_file",
    "reset",
    "seconds",
    "walk",
]


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tend' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
