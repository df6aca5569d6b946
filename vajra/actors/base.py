"""What every actor process shares: its entry point, signal handling and reply helpers.

An actor is a class with ``async def run(self, *, task_status)`` that binds its sockets,
reports readiness through ``task_status.started(addresses)`` and serves until cancelled, and
``async def drain(self)`` which finishes in-flight work (bounded in time) before the process
exits. :func:`run_actor_process` wires that to SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio
import zmq

from vajra.bus.codec import encode
from vajra.bus.messages import ErrorReply, StatsReply
from vajra.bus.zsocket import ZSocket
from vajra.errors import VajraError

log = logging.getLogger("vajra.actors")


class Actor(Protocol):
    name: str

    async def run(
        self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    async def drain(self) -> None: ...


async def wait_until(predicate: Callable[[], bool], *, poll_s: float = 0.02) -> None:
    """Wait until ``predicate()`` holds; for drains, where several tasks change the condition."""
    while not predicate():  # noqa: ASYNC110 - polling is simplest when many tasks touch the state
        await trio.sleep(poll_s)


def now_ms() -> int:
    return int(time.time() * 1000)


def error_frames(request_id: str, exc: VajraError, *, reply_to: str | None = None) -> list[bytes]:
    """Frames for an ErrorReply built from a Vajra exception."""
    return encode(
        ErrorReply(
            request_id=request_id,
            code=exc.code.value,
            message=exc.message,
            field=exc.field,
            retriable=exc.retriable,
        ),
        reply_to=reply_to,
    )


def stats_frames(request_id: str, actor: str, counters: Counter[str]) -> list[bytes]:
    return encode(StatsReply(request_id=request_id, actor=actor, counters=dict(counters)))


async def send_routed(sock: ZSocket, identity: bytes, frames: Sequence[bytes]) -> None:
    """Send on a ROUTER socket to one peer."""
    await sock.send([identity, *frames])


def new_context() -> zmq.Context[Any]:
    return zmq.Context(io_threads=1)


async def serve_until_signalled(actor: Actor) -> None:
    """Run ``actor`` until SIGINT/SIGTERM, then let it drain and return."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            log.info("%s: ready", actor.name)
            async for signum in signals:
                log.info("%s: signal %s, draining", actor.name, signal.Signals(signum).name)
                break
            await actor.drain()
            nursery.cancel_scope.cancel()


def configure_logging(name: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
    )
