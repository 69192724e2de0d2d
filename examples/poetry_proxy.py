"""A poetry proxy as an app file (the seed's exercise 2).

Run a poetry server on 10000 (`tend --nodaemon --pidfile '' poetry`), then this proxy
with `tend --nodaemon -y examples/poetry_proxy.py`, and fetch through it with
`get-poetry 10001`. The first client makes the proxy fetch the poem from 10000; every
later client gets the poem the proxy kept.
"""

import tend
from tend.poetry.proxy import PoetryProxyFactory, ProxyService

# configuration parameters
port = 10001
iface = "localhost"
server_host = "localhost"
server_port = 10000
timeout = 10.0  # seconds to wait for the upstream server
cache_ttl = None  # seconds to keep the poem; None keeps it forever, 0 never keeps it

# the proxy service fetches the poem from the upstream server and keeps it
proxy_service = ProxyService(server_host, server_port, timeout=timeout, cache_ttl=cache_ttl)

# the tcp service serves whatever the proxy service has to every client
factory = PoetryProxyFactory(proxy_service)
tcp_service = tend.TCPServer(port, factory, interface=iface)

top_service = tend.MultiService()
proxy_service.set_service_parent(top_service)
tcp_service.set_service_parent(top_service)

# this variable has to be named 'application'
application = tend.Application("poetryproxy")
top_service.set_service_parent(application)
