"""The service tree: Service, MultiService, Application. Makes no OS calls.

A service is a named thing that can be started and stopped; collections start their
children in the order they were added and stop them in reverse, as twistd's
``twisted.application.service`` does. Start and stop are coroutines so a service can
await whatever it needs (a database, a drain) instead of returning a Deferred.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable, Iterator

from tend.errors import TendError, quote

log = logging.getLogger("tend")


class ServiceError(TendError):
    """A misuse of the service tree: a duplicate name, a second parent."""


class Service:
    """A named service that can be started and stopped (twistd: IService / Service).

    Subclasses override :meth:`start_service` and :meth:`stop_service` and call the base
    method, as the seed's ``PoetryService`` does, so that :attr:`running` stays true.
    """

    name: str | None = None
    parent: MultiService | None = None
    running: bool = False

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"<{type(self).__name__}{label}>"

    def set_service_parent(self, parent: MultiService) -> None:
        """Attach this service to *parent* (twistd: setServiceParent)."""
        if self.parent is not None:
            raise ServiceError(f"{self!r} already has a parent, {self.parent!r}")
        parent.add_service(self)

    def disown_service_parent(self) -> None:
        """Detach this service from its parent (twistd: disownServiceParent)."""
        if self.parent is None:
            raise ServiceError(f"{self!r} has no parent")
        self.parent.remove_service(self)

    def privileged_start_service(self) -> None:
        """Do what needs the starting user's rights, such as binding a low port.

        Runs over the whole tree before any :meth:`start_service`, and before tend drops
        privileges (twistd: privilegedStartService).
        """

    async def start_service(self) -> None:
        """Start the service (twistd: startService)."""
        self.running = True

    async def stop_service(self) -> None:
        """Stop the service; return once it has fully stopped (twistd: stopService)."""
        self.running = False


class MultiService(Service):
    """A service that is also a collection of services (twistd: MultiService).

    Children start in the order they were added and stop in reverse order.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._children: list[Service] = []
        self._named: dict[str, Service] = {}
        self._background: set[asyncio.Task[None]] = set()

    def __iter__(self) -> Iterator[Service]:
        return iter(list(self._children))

    def __len__(self) -> int:
        return len(self._children)

    def get_service_named(self, name: str) -> Service:
        """Return the child called *name* (twistd: getServiceNamed).

        Raises:
            KeyError: no child has that name.
        """
        return self._named[name]

    def add_service(self, service: Service) -> None:
        """Add *service* as a child (twistd: addService).

        A child added to a running collection is privileged-started and started at once,
        in the background of the running loop.
        """
        if service.parent is not None:
            raise ServiceError(f"{service!r} already has a parent, {service.parent!r}")
        if service.name is not None:
            if service.name in self._named:
                raise ServiceError(
                    f"cannot add {service!r} to {self!r}: "
                    f"a service named {quote(service.name)} is already there"
                )
            self._named[service.name] = service
        self._children.append(service)
        service.parent = self
        if self.running:
            self._start_late(service)

    def _start_late(self, service: Service) -> None:
        service.privileged_start_service()
        self._in_background(service.start_service(), "start")

    def _in_background(self, work: Coroutine[object, object, None], what: str) -> None:
        # The caller is synchronous, so the task is owned here and its failure logged.
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._background.discard(task)
            if not task.cancelled() and (error := task.exception()) is not None:
                log.error("a child of %r failed to %s", self, what, exc_info=error)

        task.add_done_callback(done)

    def remove_service(self, service: Service) -> None:
        """Remove the child *service* (twistd: removeService).

        Removing a running child from a running collection stops it in the background.
        """
        if service.parent is not self:
            raise ServiceError(f"{service!r} is not a child of {self!r}")
        self._children.remove(service)
        if service.name is not None:
            del self._named[service.name]
        service.parent = None
        if service.running:
            self._in_background(service.stop_service(), "stop")

    def privileged_start_service(self) -> None:
        """Run every child's privileged start, in order."""
        for child in self:
            child.privileged_start_service()

    async def start_service(self) -> None:
        """Start every child in order; on a failure, stop those started, in reverse."""
        started: list[Service] = []
        for child in self:
            try:
                await child.start_service()
            except BaseException:
                await _stop_all(reversed(started))
                raise
            started.append(child)
        await super().start_service()

    async def stop_service(self) -> None:
        """Stop every running child in reverse order; one failing does not stop the rest."""
        await super().stop_service()
        # Let late starts and stops finish first, so no child is left running or half-stopped.
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await _stop_all(child for child in reversed(self._children) if child.running)


async def _stop_all(services: Iterable[Service]) -> None:
    """Stop each service in turn, logging (not raising) a failure so siblings still stop."""
    for service in services:
        try:
            await service.stop_service()
        except Exception:
            log.exception("error while stopping %r", service)


class Application(MultiService):
    """The root of a service tree, with the user and group to run as (twistd: Application).

    *uid* and *gid* take names or numbers; the command line's ``--uid``/``--gid`` win.
    """

    def __init__(
        self, name: str, uid: int | str | None = None, gid: int | str | None = None
    ) -> None:
        super().__init__(name)
        self.uid = uid
        self.gid = gid


def walk(service: Service) -> Iterator[Service]:
    """Yield *service* and every service below it, parents before children, in order."""
    yield service
    if isinstance(service, MultiService):
        for child in service:
            yield from walk(child)
