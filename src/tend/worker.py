"""The worker process: drops privileges, then runs the serve loop over the tree.

The supervisor forks each worker with the tree already built and its sockets bound;
the worker keeps its own copy of each listener, sends its log lines to the supervisor
if the supervisor writes the log file, becomes the user it runs as for good, and serves
until told to stop. Whatever fails is reported to the supervisor as one ``ERROR=`` line.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass

from tend import daemon
from tend.channel import Channel
from tend.errors import TendError
from tend.logs import LogSink
from tend.net import listeners
from tend.privileges import Identity, drop_privileges
from tend.serve import LoopFactory, serve
from tend.service import Application
from tend.signals import Signals

log = logging.getLogger("tend")


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """What a worker needs to know, decided by the supervisor before it forks."""

    number: int  # from 1
    application: Application
    identity: Identity
    loop_factory: LoopFactory
    shutdown_timeout: float
    watchdog_interval: float | None
    supervisor_pid: int
    max_connections: int = 0


def run_worker(
    plan: WorkerPlan, channel: Channel, log_pipe: int | None, signals: Signals, sink: LogSink
) -> int:
    """Run worker *plan.number* in this freshly forked process; return its exit status."""
    try:
        if log_pipe is not None:
            sink.relay_to(log_pipe)
        for server in listeners(plan.application):
            if server.listening is not None:
                server.listening.choose(plan.number - 1)
        drop_privileges(plan.identity)
        # After the drop: a change of credentials clears the request.
        daemon.die_with_parent(signal.SIGTERM, plan.supervisor_pid)
        return serve(
            plan.application,
            channel,
            signals,
            loop_factory=plan.loop_factory,
            shutdown_timeout=plan.shutdown_timeout,
            watchdog_interval=plan.watchdog_interval,
            max_connections=plan.max_connections,
        )
    except TendError as error:
        log.error("tend: %s", error)
        channel.send(ERROR=error)
    except BaseException as error:
        log.exception("worker %d stopped on an unexpected error", plan.number)
        channel.send(ERROR=f"worker {plan.number} failed: {type(error).__name__}: {error}")
    finally:
        sink.close()
        channel.close()
    return 1
