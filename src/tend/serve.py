"""The serve loop: start the tree, report ready, wait for a stop, stop by a deadline.

It runs in the process that serves (a worker), on an event loop of its own, and knows
nothing of forking, pidfiles or privileges: it reports on the channel it is handed
(``READY=1`` once every service has started, ``WATCHDOG=1`` from the loop itself), and
acts on the stop signals recorded for it. This is the only module that runs an event
loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from tend.channel import Channel
from tend.errors import StartupError, TendError, describe_error, quote
from tend.net import AcceptErrorLog, limit_connections, listeners, stopping_by
from tend.service import Application, MultiService, Service, walk
from tend.settings import LOOPS
from tend.signals import Signals, name_of
from tend.supervision import STOP_OVERRUN

log = logging.getLogger("tend")


LoopFactory = Callable[[], asyncio.AbstractEventLoop]

# How long a stop at once waits for the services' cancelled stop, after the resets.
CANCEL_GRACE = 1.0


def serve(
    application: Application,
    channel: Channel,
    signals: Signals,
    *,
    loop_factory: LoopFactory,
    shutdown_timeout: float,
    start_timeout: float = 0.0,
    ping_interval: float | None = None,
    max_connections: int = 0,
) -> int:
    """Serve *application* until a stop signal; return the exit status.

    *start_timeout* bounds the start (0: no bound); every *ping_interval* seconds the loop
    says ``WATCHDOG=1``, so whoever listens knows it is not stuck. Its listeners share one
    limit of *max_connections* connections at once (0: as many as the open-file limit
    allows, see `tend.net.default_max_connections`).

    Raises:
        StartupError: a service failed to start, or did not finish in time, or a stop
            signal came first.
    """
    serving = _Serving(
        application,
        channel,
        signals,
        shutdown_timeout,
        start_timeout,
        ping_interval,
        max_connections,
    )
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serving.run())


class _Serving:
    def __init__(
        self,
        application: Application,
        channel: Channel,
        signals: Signals,
        shutdown_timeout: float,
        start_timeout: float,
        ping_interval: float | None,
        max_connections: int = 0,
    ) -> None:
        self.application = application
        self.channel = channel
        self.signals = signals
        self.shutdown_timeout = shutdown_timeout
        self.start_timeout = start_timeout
        self.ping_interval = ping_interval
        self.max_connections = max_connections
        self.stop_signals: list[str] = []
        self.stop_requested = asyncio.Event()
        self.second_signal = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        log.info("event loop class: %s.", _qualified_name(type(loop)))
        # Out of descriptors, a loop reports every failed accept(): a line a second is enough.
        loop.set_exception_handler(AcceptErrorLog())
        limit_connections(self.application, self.max_connections)
        self.signals.hand_to_loop(loop, self._on_signal)
        if not self.channel.closed:
            loop.add_reader(self.channel.fileno(), self._on_message)
        watchdog = None
        try:
            await self._start_unless_stopped()
            _flush_log()  # whoever waits for READY may read the log next
            self.channel.send(READY=1)
            if self.ping_interval is not None:
                watchdog = asyncio.create_task(self._ping_watchdog(self.ping_interval))
            await self.stop_requested.wait()
            return await self._stop()
        finally:
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
            self.signals.take_back_from_loop(loop)
            if not self.channel.closed:
                loop.remove_reader(self.channel.fileno())
            log.info("Main loop terminated.")

    def _on_signal(self, signal_number: int) -> None:
        # In the loop, not in a handler: record and wake; the main coroutine does the work.
        self._request_stop(name_of(signal_number))

    def _on_message(self) -> None:
        """What the other end says: STOP=1 stands in for SIGTERM (a supervisor that may
        not signal this process), STOP=now asks for the stop at once; its hanging up means
        nobody waits for this one."""
        try:
            message = self.channel.receive()
        except BlockingIOError:
            return
        if message is None:
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
            self._request_stop("a hang-up from the supervisor")
        elif message.stop:
            self._request_stop("STOP from the supervisor")
        elif message.stop_now:
            self._request_stop("STOP=now from the supervisor", at_once=True)

    def _request_stop(self, name: str, *, at_once: bool = False) -> None:
        """Begin the graceful stop; with *at_once*, end it now.

        Only the supervisor asks for "at once" (on its own second signal), over the
        channel. A stop signal that comes again is the same stop, however late: sent to
        the whole process group (systemd's KillMode=control-group, supervisord's
        stopasgroup, kill -TERM -PGID) and passed on by tend's supervisor as well.
        """
        if not self.stop_signals:
            self.stop_signals.append(name)
            self.stop_requested.set()
        if at_once and not self.second_signal.is_set():
            self.stop_signals.append(name)
            self.second_signal.set()

    async def _ping_watchdog(self, interval: float) -> None:
        """Say "still alive" every *interval* seconds, from the loop itself.

        Sent from a task on the event loop, so a loop blocked by a runaway callback
        stops the pings, and the supervisor (and systemd behind it) notices.
        """
        servers = listeners(self.application)
        while True:
            # With what it serves, for `tendctl status`.
            self.channel.send(
                WATCHDOG=1,
                CONNECTIONS=sum(server.connection_count for server in servers),
                SERVED=sum(server.served for server in servers),
            )
            await asyncio.sleep(interval)

    async def _start_unless_stopped(self) -> None:
        """Start the tree; a stop signal, or the start timeout, cancels the start."""
        starting = asyncio.create_task(self._start())
        stopped = asyncio.create_task(self.stop_requested.wait())
        try:
            await asyncio.wait(
                {starting, stopped},
                timeout=self.start_timeout or None,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopped.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopped
        if not starting.done():
            late = _unfinished(self.application)
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            if self.stop_signals:
                raise StartupError(
                    f"stopped by {self.stop_signals[0]} before the services were ready"
                )
            raise StartupError(
                f"{late!r} did not finish starting within {self.start_timeout:g} s "
                "(--start-timeout)"
            )
        starting.result()

    async def _start(self) -> None:
        with starting(self.application):
            await self.application.start_service()

    async def _stop(self) -> int:
        loop = asyncio.get_running_loop()
        log.info("Received %s, shutting down.", self.stop_signals[0])
        self.channel.send(STOPPING=1)
        servers = listeners(self.application)
        for server in servers:  # new clients are refused at once, before any drain
            server.stop_listening()
        limit = self.shutdown_timeout + STOP_OVERRUN
        with stopping_by(loop.time() + self.shutdown_timeout):
            stopping = asyncio.create_task(self.application.stop_service())
        second = asyncio.create_task(self.second_signal.wait())
        done, _ = await asyncio.wait(
            {stopping, second}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
        )
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second
        if stopping not in done:
            if second in done:
                log.warning("Asked by the supervisor to stop at once.")
            else:
                log.error("services did not stop within %.1f s; stopping at once.", limit)
            # Reset first: a stop_service that never returns from its cancellation (one
            # awaiting wait_closed() on a client that does not read) must not keep a cut
            # poem from ending in a reset.
            for server in servers:
                server.reset_all()
            stopping.cancel()
            await asyncio.wait({stopping}, timeout=CANCEL_GRACE)
            if stopping.done() and not stopping.cancelled():
                stopping.exception()  # retrieved, so asyncio does not log it as lost
            return 1
        status = 0
        if (error := stopping.exception()) is not None:
            log.error("error while stopping the services", exc_info=error)
            status = 1
        if any(server.aborted_connections for server in servers):
            status = 1
        return status


@contextlib.contextmanager
def starting(application: Service) -> Iterator[None]:
    """Turn a failed start into one line for the user, the traceback into the log.

    A TendError already is that line; anything else is a bug in a service, whose
    traceback goes to the log.
    """
    try:
        yield
    except TendError:
        raise
    except SystemExit as error:
        status = quote(error.code) if isinstance(error.code, str) else error.code
        raise StartupError(f"a service called sys.exit({status}) while starting") from None
    except Exception as error:
        log.exception("a service failed to start")
        raise StartupError(
            f"a service failed to start: {describe_error(error)} (the traceback is in the log)"
        ) from None


def _unfinished(application: Service) -> Service:
    """The service whose start is still running: the first one not running yet whose
    children, if it has any, all are."""
    for service in walk(application):
        children = list(service) if isinstance(service, MultiService) else []
        if not service.running and all(child.running for child in children):
            return service
    return application


def event_loop_factory(name: str) -> LoopFactory:
    """The event loop constructor for ``--loop NAME``; checked before anything starts.

    ``auto``, the default, takes uvloop when it is installed, as uvicorn does: it halves
    the CPU a connection costs (see the README's benchmark), and asyncio is there if not.
    """
    if name == "auto":
        try:
            return event_loop_factory("uvloop")
        except StartupError:
            return asyncio.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise StartupError(
                "cannot use the uvloop event loop: uvloop is not installed; "
                "install it with: pip install 'tend[uvloop]'"
            ) from None
        factory: LoopFactory = uvloop.new_event_loop
        return factory
    raise StartupError(f"unknown event loop {quote(name)}; expected one of {', '.join(LOOPS)}")


def _flush_log() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def _qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"
