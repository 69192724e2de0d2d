"""The worker process: drops privileges, then runs the serve loop over the tree.

The supervisor forks each worker with the tree already built and its sockets bound;
the worker keeps its own copy of each listener, sends its log lines to the supervisor
if the supervisor writes the log file, becomes the user it runs as for good, and serves
until told to stop. Whatever fails is reported to the supervisor as one ``ERROR=`` line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tend.channel import Channel
from tend.errors import TendError, describe_error
from tend.logs import LogSink
from tend.net import listeners
from tend.privileges import Identity, drop_privileges
from tend.serve import LoopFactory, serve
from tend.service import Application
from tend.signals import Signals
from tend.supervision import Limits

log = logging.getLogger("tend")


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """What a worker needs to know, decided by the supervisor before it forks."""

    number: int  # from 1
    application: Application
    identity: Identity
    loop_factory: LoopFactory
    limits: Limits
    ping_interval: float | None  # how often to tell the supervisor the loop is alive
    max_connections: int = 0  # open at once in this worker; 0: from the open-file limit


# The number of the worker this process is, once it is one (see current_worker).
_current: int | None = None


def current_worker() -> int | None:
    """The number, from 1, of the tend worker this process is; None outside a worker.

    For a service that needs a resource of its own per worker (a console's socket, a
    per-worker file) in a tree every worker runs a copy of.
    """
    return _current


def run_worker(
    plan: WorkerPlan, channel: Channel, log_pipe: int | None, signals: Signals, sink: LogSink
) -> int:
    """Run worker *plan.number* in this freshly forked process; return its exit status."""
    global _current
    _current = plan.number
    try:
        if log_pipe is not None:
            sink.relay_to(log_pipe)
        for server in listeners(plan.application):
            if server.listening is not None:
                server.listening.choose(plan.number - 1)
        drop_privileges(plan.identity)
        # A supervisor killed outright closes its end of the channel: the serve loop takes
        # the hang-up as a stop, so no worker serves on orphaned.
        return serve(
            plan.application,
            channel,
            signals,
            loop_factory=plan.loop_factory,
            shutdown_timeout=plan.limits.shutdown_timeout,
            start_timeout=plan.limits.start_timeout,
            ping_interval=plan.ping_interval,
            max_connections=plan.max_connections,
        )
    except TendError as error:
        # The supervisor logs it: once for a failed start, however many workers fail alike.
        channel.send(ERROR=error)
    except BaseException as error:
        log.exception("worker %d stopped on an unexpected error", plan.number)
        channel.send(ERROR=f"worker {plan.number} failed: {describe_error(error)}")
    finally:
        sink.close()
        channel.close()
    return 1
