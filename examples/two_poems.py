"""Two poems on two ports, one daemon (the seed's exercise 1).

Run it with `tend --nodaemon -y examples/two_poems.py`, then fetch the poems with
`get-poetry 10000 10001`. Each poem's PoetryService and its listener are grouped in a
MultiService of their own, and both groups hang off one Application, so the tree is:

    Application "twopoems"
      MultiService "ecstasy"  -> PoetryService, TCPServer on 10000
      MultiService "tyger"    -> PoetryService, TCPServer on 10001
"""

import os

import tend
from tend.poetry import POEMS
from tend.poetry.server import PoetryFactory, PoetryService

# configuration parameters
iface = "localhost"
poems = [
    ("ecstasy", 10000, os.path.join(POEMS, "ecstasy.txt")),
    ("tyger", 10001, os.path.join(POEMS, "tyger.txt")),
]

# this variable has to be named 'application'
application = tend.Application("twopoems")

for name, port, poetry_file in poems:
    # one collection per poem keeps each poem's services together and apart from the other
    top_service = tend.MultiService(name)

    # the poetry service holds the poem. it will load the poem when it is started
    poetry_service = PoetryService(poetry_file)
    poetry_service.set_service_parent(top_service)

    # the tcp service connects the factory to a listening socket
    factory = PoetryFactory(poetry_service)
    tcp_service = tend.TCPServer(port, factory, interface=iface)
    tcp_service.set_service_parent(top_service)

    # this hooks the collection we made to the application
    top_service.set_service_parent(application)
