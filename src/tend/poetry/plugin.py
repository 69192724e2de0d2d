"""The ``poetry`` plugin: ``tend poetry --port 10000 --poem FILE`` (the seed's Fast Poetry 3.0)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from tend import (
    EndpointSyntaxError,
    MultiService,
    Option,
    Service,
    ServiceMaker,
    StreamServer,
    parse_endpoint,
)
from tend.poetry import DEFAULT_POEM
from tend.poetry.server import PoetryFactory, PoetryService


def parse_port(text: str) -> str:
    """Accept a port number or an endpoint description, as ``--port`` does."""
    try:
        parse_endpoint(text)
    except EndpointSyntaxError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def poem_path(text: str) -> str:
    """A poem path, made absolute now: the daemon changes directory before reading it."""
    return os.path.abspath(text)


class PoetryMaker(ServiceMaker):
    name = "poetry"
    description = "A fast poetry service."
    options = (
        Option("port", "p", "10000", "The port number or endpoint to listen on.", type=parse_port),
        Option("iface", None, "localhost", "The interface to listen on."),
        Option("poem", None, DEFAULT_POEM, "The file containing the poem.", type=poem_path),
    )

    def make_service(self, options: Mapping[str, object]) -> Service:
        top_service = MultiService()
        poetry_service = PoetryService(str(options["poem"]))
        poetry_service.set_service_parent(top_service)
        factory = PoetryFactory(poetry_service)
        listener = StreamServer(
            str(options["port"]), factory, default_interface=str(options["iface"])
        )
        listener.set_service_parent(top_service)
        return top_service


service_maker = PoetryMaker()
