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
from tend.errors import StartupError, TendError, quote
from tend.net import AcceptErrorLog, limit_connections, listeners, stopping_by
from tend.service import Application, Service
from tend.settings import LOOPS
from tend.signals import Signals, name_of

log = logging.getLogger("tend")

# How long stop_service may overrun the drain deadline before tend gives up on it.
STOP_OVERRUN = 5.0

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def serve(
    application: Application,
    channel: Channel,
    signals: Signals,
    *,
    loop_factory: LoopFactory,
    shutdown_timeout: float,
    watchdog_interval: float | None = None,
    max_connections: int = 0,
) -> int:
    """Serve *application* until a stop signal; return the exit status.

    Its listeners share one limit of *max_connections* connections at once (0: as many as
    the open-file limit allows, see `tend.net.default_max_connections`).

    Raises:
        StartupError: a service failed to start, or a stop signal came first.
    """
    serving = _Serving(
        application, channel, signals, shutdown_timeout, watchdog_interval, max_connections
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
        watchdog_interval: float | None,
        max_connections: int = 0,
    ) -> None:
        self.application = application
        self.channel = channel
        self.signals = signals
        self.shutdown_timeout = shutdown_timeout
        self.watchdog_interval = watchdog_interval
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
        watchdog = None
        try:
            await self._start_unless_stopped()
            _flush_log()  # whoever waits for READY may read the log next
            self.channel.send(READY=1)
            if self.watchdog_interval is not None:
                watchdog = asyncio.create_task(self._ping_watchdog(self.watchdog_interval))
            await self.stop_requested.wait()
            return await self._stop()
        finally:
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
            self.signals.take_back_from_loop(loop)
            log.info("Main loop terminated.")

    def _on_signal(self, signal_number: int) -> None:
        # In the loop, not in a handler: record and wake; the main coroutine does the work.
        self.stop_signals.append(name_of(signal_number))
        self.stop_requested.set()
        if len(self.stop_signals) > 1:
            self.second_signal.set()

    async def _ping_watchdog(self, interval: float) -> None:
        """Say "still alive" every *interval* seconds, from the loop itself.

        Sent from a task on the event loop, so a loop blocked by a runaway callback
        stops the pings, and the supervisor (and systemd behind it) notices.
        """
        while True:
            self.channel.send(WATCHDOG=1)
            await asyncio.sleep(interval)

    async def _start_unless_stopped(self) -> None:
        """Start the tree; a stop signal meanwhile cancels the start instead of waiting."""
        starting = asyncio.create_task(self._start())
        stopped = asyncio.create_task(self.stop_requested.wait())
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopped
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            raise StartupError(f"stopped by {self.stop_signals[0]} before the services were ready")
        starting.result()

    async def _start(self) -> None:
        with starting(self.application):
            await self.application.start_service()

    async def _stop(self) -> int:
        loop = asyncio.get_running_loop()
        log.info("Received %s, shutting down.", self.stop_signals[0])
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
                log.warning("Received %s again, stopping at once.", self.stop_signals[-1])
            else:
                log.error("services did not stop within %.1f s; stopping at once.", limit)
            stopping.cancel()
            with contextlib.suppress(BaseException):
                await stopping
            for server in servers:
                server.reset_all()
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
    except Exception as error:
        log.exception("a service failed to start")
        raise StartupError(
            f"a service failed to start: {type(error).__name__}: {error} "
            "(the traceback is in the log)"
        ) from None


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
