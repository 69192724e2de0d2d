"""The ``tend web`` plugin: serve a folder's files over HTTP/1.1, safely by default.

``tend web --path DIR`` serves DIR on 127.0.0.1:8080: GET and HEAD, conditional requests,
byte ranges, keep-alive and pipelining, an index file or a listing. It refuses what would
leave the folder (``..``, encoded slashes, symlinks out of it) and hides dotfiles. This
module holds the options and the service tree; `tend.builtins.httpfiles` decides each
answer and `tend.builtins.httpserver` (which needs h11, the ``web`` extra) speaks HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping, Sequence

from tend import (
    Flag,
    MultiService,
    Option,
    Service,
    ServiceMaker,
    StartupError,
    StreamServer,
    endpoint_text,
    positive_seconds,
    quote,
)
from tend.builtins.common import warn_if_exposed, whole_number

log = logging.getLogger(__name__)

DEFAULT_PORT = "8080"
INSTALL_HINT = "tend web needs h11: pip install 'tend[web]'"


connections = whole_number(1, 1_000_000, "connection count")
header_bytes = whole_number(1024, 1024 * 1024, "header size")


def index_name(text: str) -> str:
    """A file name, without slashes, for ``--index``."""
    if not text or "/" in text or "\\" in text or "\x00" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"invalid index file name {quote(text)}: expected a plain file name"
        )
    return text


class WebService(MultiService):
    """The folder's site and one listener per ``--listen``; closes idle clients on stop."""

    def __init__(self, maker_options: Mapping[str, object], listen: Sequence[str]) -> None:
        super().__init__()
        from tend.builtins.httpfiles import Site
        from tend.builtins.httpserver import HTTPFactory, Limits

        self.site = Site(
            str(maker_options["path"]),
            listing=not maker_options["no_listing"],
            show_dotfiles=bool(maker_options["show_dotfiles"]),
            follow_symlinks=bool(maker_options["follow_symlinks"]),
            index=str(maker_options["index"]),
        )
        self.factory = HTTPFactory(
            self.site,
            Limits(
                idle_timeout=_float(maker_options["idle_timeout"]),
                header_timeout=_float(maker_options["header_timeout"]),
                max_header_bytes=int(str(maker_options["max_header_bytes"])),
                max_connections=int(str(maker_options["max_connections"])),
            ),
        )
        interface = str(maker_options["iface"])
        self.listeners = [
            StreamServer(description, self.factory, default_interface=interface)
            for description in listen
        ]
        for listener in self.listeners:
            listener.set_service_parent(self)

    def privileged_start_service(self) -> None:
        """Bind the listeners, then warn once for each that other hosts can reach."""
        super().privileged_start_service()
        for listener in self.listeners:
            warn_if_exposed(listener, f"anyone who can reach it can read {self.site.root}", log)

    async def start_service(self) -> None:
        """Check the folder can be served, then listen."""
        try:
            await asyncio.to_thread(self.site.check)
        except OSError as error:
            raise StartupError(
                f"cannot serve folder {quote(self.site.root)}: {error.strerror or error}"
            ) from None
        log.info("serving folder %s", self.site.root)
        await super().start_service()

    async def stop_service(self) -> None:
        """Close idle keep-alive connections at once, then stop the listeners (drain)."""
        self.factory.stop()
        await super().stop_service()


class WebMaker(ServiceMaker):
    name = "web"
    description = (
        "Serve a folder's files over HTTP/1.1 (GET, HEAD, ranges, keep-alive), "
        "refusing what leads out of it."
    )
    options = (
        Option(
            "listen",
            None,
            DEFAULT_PORT,
            "A port or endpoint to listen on (tcp:PORT:interface=ADDR, tls:, unix:, systemd:); "
            "give it again to listen on several.",
            type=endpoint_text,
            metavar="ENDPOINT",
            repeatable=True,
        ),
        Option("iface", None, "127.0.0.1", "The interface a bare port listens on."),
        Option("path", None, ".", "The folder to serve.", path=True),
        Option("index", None, "index.html", "The file served for a folder.", type=index_name),
        Flag("no-listing", None, "Answer 403 for a folder without an index file."),
        Flag("show-dotfiles", None, "Serve and list names starting with a dot."),
        Flag(
            "follow-symlinks",
            None,
            "Serve what symlinks point to even outside the folder (refused by default).",
        ),
        Option(
            "max-connections",
            None,
            "256",
            "Answer 503 to clients beyond this many open connections.",
            type=connections,
        ),
        Option(
            "idle-timeout",
            None,
            "30",
            "Close a keep-alive connection idle this long, or a client that stops reading.",
            type=positive_seconds,
        ),
        Option(
            "header-timeout",
            None,
            "10",
            "A request's line and headers must arrive within this many seconds (408).",
            type=positive_seconds,
        ),
        Option(
            "max-header-bytes",
            None,
            "16384",
            "The largest request line and headers, in bytes (431 beyond).",
            type=header_bytes,
        ),
    )

    def make_service(self, options: Mapping[str, object]) -> Service:
        try:
            import h11  # noqa: F401 -- only to say what to install, in one line
        except ImportError:
            raise StartupError(INSTALL_HINT) from None
        listen = options["listen"]
        if not isinstance(listen, list):
            raise TypeError(f"--listen: expected a list of endpoints, not {listen!r}")
        return WebService(options, [str(item) for item in listen])


def _float(value: object) -> float:
    return value if isinstance(value, float) else float(str(value))


service_maker = WebMaker()
