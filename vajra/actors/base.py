"""What every actor process shares: its entry point, signal handling and reply helpers.

An actor is a class with ``async def run(self, *, task_status)`` that binds its sockets,
reports readiness through ``task_status.started(addresses)`` and serves until cancelled, and
``async def drain(self)`` which finishes in-flight work (bounded in time) before the process
exits. :func:`serve_until_signalled` wires that to SIGINT/SIGTERM and to the exit of the
supervisor that started the process (its lifeline pipe, ``$VAJRA_PARENT_FD``).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import stat
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import trio

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
            retry_after_ms=round(getattr(exc, "retry_after_s", 0.0) * 1000),
        ),
        reply_to=reply_to,
    )


def stats_frames(request_id: str, actor: str, counters: Counter[str]) -> list[bytes]:
    return encode(StatsReply(request_id=request_id, actor=actor, counters=dict(counters)))


async def send_routed(sock: ZSocket, identity: bytes, frames: Sequence[bytes]) -> None:
    """Send on a ROUTER socket to one peer."""
    await sock.send([identity, *frames])


#: The environment variable naming the read end of the supervisor's lifeline pipe.
PARENT_FD_ENV = "VAJRA_PARENT_FD"
#: The environment variable naming this process's copy of the home lock (``run/lock``).
HOME_LOCK_FD_ENV = "VAJRA_HOME_LOCK_FD"
#: How long an actor whose supervisor died may drain before it exits anyway (no one else
#: will stop it).
ORPHAN_DRAIN_LIMIT_S = 10.0


def inherited_parent_fd(env: dict[str, str] | None = None) -> int | None:
    """The lifeline pipe this process inherited from ``vajra up`` ($VAJRA_PARENT_FD), if any.

    The supervisor keeps the pipe's only write end, so the read end reaches end-of-file
    exactly when the supervisor exits, however it exits (kill -9 included). The descriptor
    (and the home lock's, $VAJRA_HOME_LOCK_FD) is made non-inheritable here, so this actor's
    own children do not keep it open.
    """
    env = dict(os.environ) if env is None else env
    _disinherit(env.get(HOME_LOCK_FD_ENV, ""))
    value = env.get(PARENT_FD_ENV, "")
    if not value:
        return None
    try:
        fd = int(value)
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise OSError(f"fd {fd} is not a pipe")
    except (ValueError, OSError) as exc:
        log.warning("ignoring %s=%r: %s", PARENT_FD_ENV, value, exc)
        return None
    os.set_inheritable(fd, False)
    return fd


def _disinherit(value: str) -> None:
    """Keep an inherited descriptor (the home lock) from this actor's own children: held by
    them, it would keep the home taken after the actor exits."""
    try:
        os.set_inheritable(int(value), False)
    except (ValueError, OSError):
        pass


async def wait_for_parent_exit(fd: int) -> None:
    """Return once the pipe ``fd`` reaches end-of-file: the supervisor has exited."""
    os.set_blocking(fd, False)
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            if not os.read(fd, 512):
                return
        except BlockingIOError:
            continue


def freeze_startup_heap() -> None:
    """Collect once, then move every object that survived the actor's start (its imports, the
    model, the configuration: about 480,000 objects in an executor) into the collector's
    permanent generation, so that a full collection later walks only what serving allocated.
    A full collection holds the GIL and so stalls every thread of the process, an executor's
    engine steps included: with torch, transformers and the tiny model loaded, one took about
    270 ms on a 2-core CPU machine before the freeze and under a millisecond after."""
    gc.collect()
    gc.freeze()


async def serve_until_signalled(
    actor: Actor,
    *,
    parent_fd: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run ``actor`` until SIGINT/SIGTERM or its supervisor's exit, then let it drain and return.

    ``parent_fd`` defaults to :func:`inherited_parent_fd`: when the supervisor dies (the
    pipe closes) the actor stops as on SIGTERM, but its drain is cut off after
    ``ORPHAN_DRAIN_LIMIT_S``, since no supervisor will kill it. A stop requested while the
    actor is still starting cancels the start (there is nothing to drain yet). ``on_ready``
    runs once the actor has started (an actor process passes :func:`freeze_startup_heap`).
    """
    if parent_fd is None:
        parent_fd = inherited_parent_fd()
    stop = trio.Event()
    orphaned = False

    async def on_signal(signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            log.info("%s: signal %s, draining", actor.name, signal.Signals(signum).name)
            stop.set()
            return

    async def on_parent_exit(fd: int) -> None:
        nonlocal orphaned
        await wait_for_parent_exit(fd)
        if not stop.is_set():
            orphaned = True
            log.warning("%s: the supervisor exited; draining, then exiting", actor.name)
            stop.set()

    async def cancel_on_stop(scope: trio.CancelScope) -> None:
        await stop.wait()
        scope.cancel()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(on_signal, signals)
            if parent_fd is not None:
                nursery.start_soon(on_parent_exit, parent_fd)
            started = False
            with trio.CancelScope() as startup:
                nursery.start_soon(cancel_on_stop, startup)
                await nursery.start(actor.run)
                started = True
            if started:
                if on_ready is not None:
                    on_ready()
                log.info("%s: ready", actor.name)
                await stop.wait()
                with trio.move_on_after(ORPHAN_DRAIN_LIMIT_S if orphaned else math.inf) as limit:
                    await actor.drain()
                if limit.cancelled_caught:
                    log.warning("%s: drain cut off after %.0fs", actor.name, ORPHAN_DRAIN_LIMIT_S)
            else:
                log.info("%s: stopped while starting", actor.name)
            nursery.cancel_scope.cancel()


class _RedactingFormatter(logging.Formatter):
    """Masks the password of any URL in a log line (``redis://:***@host:port``)."""

    def format(self, record: logging.LogRecord) -> str:
        from vajra.state.connection import redact_secrets

        return redact_secrets(super().format(record))


def configure_logging(name: str) -> None:
    """Log INFO and up to stderr as ``time NAME LEVEL message``, with URL passwords masked."""
    handler = logging.StreamHandler()
    handler.setFormatter(_RedactingFormatter(f"%(asctime)s {name} %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
