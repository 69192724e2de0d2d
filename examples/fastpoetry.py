"""FastPoetry 2.0 as an app file: run it with `tend --nodaemon -y examples/fastpoetry.py`.

Running `python examples/fastpoetry.py` starts nothing: an app file only builds the tree.
"""

import tend
from tend.poetry import DEFAULT_POEM
from tend.poetry.server import PoetryFactory, PoetryService

# configuration parameters
port = 10000
iface = "localhost"
poetry_file = DEFAULT_POEM

# this will hold the services that combine to form the poetry server
top_service = tend.MultiService()

# the poetry service holds the poem. it will load the poem when it is started
poetry_service = PoetryService(poetry_file)
poetry_service.set_service_parent(top_service)

# the tcp service connects the factory to a listening socket. it will create the
# listening socket when it is started
factory = PoetryFactory(poetry_service)
tcp_service = tend.TCPServer(port, factory, interface=iface)
tcp_service.set_service_parent(top_service)

# this variable has to be named 'application'
application = tend.Application("fastpoetry")

# this hooks the collection we made to the application
top_service.set_service_parent(application)
