"""The tutorial's poetry proxy as a twistd plugin: the twistd side of the proxy rows.

Exercise 4 of part 16 of the Twisted tutorial ("Create a new plugin for the poetry
proxy server"), built from the proxy of part 13 (``twisted-server-1/poetry-proxy.py``):
a ``ProxyService`` whose ``get_poem`` returns the cached poem or fetches it with a
``ClientFactory`` and a ``Deferred``, and a server protocol that writes whatever
``maybeDeferred(get_poem)`` gives and closes. Modernised for Python 3 and today's
Twisted as ``fastpoetry_plugin.py`` is (``@implementer``, bytes, and ``log.msg``
where the tutorial printed, which is where twistd sends a print anyway). Otherwise
unchanged: like the tutorial's, this proxy has no shared in-flight fetch, so clients
that arrive before the first poem is cached each fetch their own.

One addition, the smallest that lets the benchmark measure a cache miss: ``--no-cache``
never keeps the poem, so every client makes its own upstream fetch. Run with this
folder's parent on PYTHONPATH::

    twistd --nodaemon --pidfile= -l LOGFILE poetryproxy --port 10001 --server 10000
"""

from __future__ import annotations

from typing import ClassVar

from twisted.application import internet, service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.plugin import IPlugin
from twisted.python import log, usage
from zope.interface import implementer


class PoetryProxyProtocol(Protocol):
    def connectionMade(self) -> None:
        d = maybeDeferred(self.factory.service.get_poem)
        d.addCallback(self.transport.write)
        d.addBoth(lambda _: self.transport.loseConnection())


class PoetryProxyFactory(ServerFactory):
    protocol = PoetryProxyProtocol

    def __init__(self, service: ProxyService) -> None:
        self.service = service


class PoetryClientProtocol(Protocol):
    poem = b""

    def dataReceived(self, data: bytes) -> None:
        self.poem += data

    def connectionLost(self, reason: object) -> None:
        self.factory.poem_finished(self.poem)


class PoetryClientFactory(ClientFactory):
    protocol = PoetryClientProtocol

    def __init__(self) -> None:
        self.deferred: Deferred[bytes] | None = Deferred()

    def poem_finished(self, poem: bytes) -> None:
        if self.deferred is not None:
            d, self.deferred = self.deferred, None
            d.callback(poem)

    def clientConnectionFailed(self, connector: object, reason: object) -> None:
        if self.deferred is not None:
            d, self.deferred = self.deferred, None
            d.errback(reason)


class ProxyService(service.Service):
    poem: bytes | None = None  # the cached poem

    def __init__(self, host: str, port: int, cache: bool = True) -> None:
        self.host = host
        self.port = port
        self.cache = cache

    def get_poem(self) -> bytes | Deferred[bytes]:
        if self.poem is not None:
            log.msg("Using cached poem.")
            return self.poem
        log.msg("Fetching poem from server.")
        factory = PoetryClientFactory()
        assert factory.deferred is not None
        factory.deferred.addCallback(self.set_poem)
        # Imported here, as the tutorial does: importing a plugin must not install a reactor.
        from twisted.internet import reactor

        reactor.connectTCP(self.host, self.port, factory)
        return factory.deferred

    def set_poem(self, poem: bytes) -> bytes:
        if self.cache:
            self.poem = poem
        return poem


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT, or a bare PORT on 127.0.0.1, as the tutorial's proxy takes it."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise usage.UsageError("Ports must be integers.")
    return host or "127.0.0.1", int(port)


class Options(usage.Options):
    optParameters: ClassVar[list[list[object]]] = [
        ["port", "p", 10001, "The port number to listen on."],
        ["iface", None, "localhost", "The interface to listen on."],
        ["server", None, None, "The poetry server to proxy, [HOST:]PORT."],
    ]
    optFlags: ClassVar[list[list[str | None]]] = [
        ["no-cache", None, "Fetch the poem for every client (the benchmark's cache miss)."],
    ]

    def postOptions(self) -> None:
        if self["server"] is None:
            raise usage.UsageError("Provide the server address: --server [HOST:]PORT.")
        self["server"] = parse_address(self["server"])


@implementer(service.IServiceMaker, IPlugin)
class PoetryProxyServiceMaker:
    tapname = "poetryproxy"
    description = "The poetry proxy of the Twisted tutorial."
    options = Options

    def makeService(self, options: Options) -> service.MultiService:
        top_service = service.MultiService()

        host, port = options["server"]
        proxy_service = ProxyService(host, port, cache=not options["no-cache"])
        proxy_service.setServiceParent(top_service)

        factory = PoetryProxyFactory(proxy_service)
        tcp_service = internet.TCPServer(int(options["port"]), factory, interface=options["iface"])
        tcp_service.setServiceParent(top_service)

        return top_service


service_maker = PoetryProxyServiceMaker()
