"""Fast Poetry 3.0 as a twistd plugin: the twistd side of the benchmark.

The plugin from part 16 of the Twisted tutorial ("Twisted Daemonologie"), modernised
for Python 3 and today's Twisted: ``@implementer`` instead of ``implements()``, the
poem read as bytes, f-strings. Otherwise unchanged, so the benchmark measures what a
twistd user gets. Run with this folder's parent on PYTHONPATH::

    twistd --nodaemon --pidfile= -l LOGFILE fastpoetry --port 10000 --poem FILE
"""

from __future__ import annotations

from typing import ClassVar

from twisted.application import internet, service
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.plugin import IPlugin
from twisted.python import log, usage
from zope.interface import implementer


class PoetryProtocol(Protocol):
    def connectionMade(self) -> None:
        poem = self.factory.service.poem
        log.msg(f"sending {len(poem)} bytes of poetry to {self.transport.getPeer()}")
        self.transport.write(poem)
        self.transport.loseConnection()


class PoetryFactory(ServerFactory):
    protocol = PoetryProtocol

    def __init__(self, service: PoetryService) -> None:
        self.service = service


class PoetryService(service.Service):
    def __init__(self, poetry_file: str) -> None:
        self.poetry_file = poetry_file

    def startService(self) -> None:
        service.Service.startService(self)
        with open(self.poetry_file, "rb") as f:
            self.poem = f.read()
        log.msg(f"loaded a poem from: {self.poetry_file}")


class Options(usage.Options):
    optParameters: ClassVar[list[list[object]]] = [
        ["port", "p", 10000, "The port number to listen on."],
        ["poem", None, None, "The file containing the poem."],
        ["iface", None, "localhost", "The interface to listen on."],
    ]


@implementer(service.IServiceMaker, IPlugin)
class PoetryServiceMaker:
    tapname = "fastpoetry"
    description = "A fast poetry service."
    options = Options

    def makeService(self, options: Options) -> service.MultiService:
        top_service = service.MultiService()

        poetry_service = PoetryService(options["poem"])
        poetry_service.setServiceParent(top_service)

        factory = PoetryFactory(poetry_service)
        tcp_service = internet.TCPServer(int(options["port"]), factory, interface=options["iface"])
        tcp_service.setServiceParent(top_service)

        return top_service


service_maker = PoetryServiceMaker()
