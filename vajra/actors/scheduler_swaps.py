"""The warm hot swap's coordination: the scheduler's side and the requester's side.

Data flows left to right::

    requester ─AdapterSwap─▶ scheduler ─AdapterWarm─▶ every live executor
    executors ─AdapterWarmed─▶ scheduler ─AdapterSwapDone─▶ requester ─activate (Redis)─▶ registry

A *requester* is whoever publishes a new active version: a gateway (adapter push, rollback),
or an executor that finished a training job. A gateway sends :class:`AdapterSwap` on a DEALER
socket of its own connected to the scheduler's frontend (:class:`SwapClient`); an executor
sends it on the DEALER it already has to the scheduler's dispatch socket and hands the
:class:`AdapterSwapDone` that comes back on that socket to :meth:`SwapWaiters.deliver` (its
intake does: ``Intake.swaps.request(work_in.send, swap, timeout_s)``).

The scheduler (:class:`SwapCoordinator`) only coordinates; it never touches Redis. It asks
every executor it knows as live to warm; an executor that holds ``from_digest`` in GPU memory
(or in host memory) loads ``to_digest`` into the same tier through its tiers' promotion path
(a free slot, never evicting an adapter that running requests hold) and answers; one that
does not hold it answers at once without loading anything. When every executor asked has
answered, or ``wait_ms`` passed, the requester gets ``AdapterSwapDone``: ``warmed`` lists the
executors that held the old version and now hold the new one, ``not_warmed`` those that did
not answer in time, failed to load, or were lost meanwhile (``ok`` is False when any did).

The requester then flips the registry's active pointer itself, a compare-and-set on the
version it saw active (:meth:`vajra.state.adapters.AdapterRecords.activate`), whatever ``ok``
says: a swap is never refused because an executor was slow, it only costs that executor one
cold load. Keeping Redis out of the scheduler keeps it a pure router and lets a requester
retry the whole swap when a concurrent one moved the pointer first.

Bounds: ``wait_ms`` is clamped to [0, :data:`MAX_WAIT_MS`]; at most :data:`MAX_SWAPS`
swaps run at once (more are answered ``ok=False`` at once); a reply for a swap that already
ended, from an executor that was not asked, or a second reply from one executor, is counted
and dropped. An executor lost mid-warm ends up in ``not_warmed``. A requester that stops
waiting (:class:`SwapWaiters`, bounded by its own timeout) simply flips later or not at all.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from vajra import bus
from vajra.actors.base import now_ms
from vajra.bus.codec import DecodeError, decode_many, encode
from vajra.bus.messages import AdapterSwap, AdapterSwapDone, AdapterWarm, AdapterWarmed
from vajra.bus.outbox import Outbox
from vajra.bus.zsocket import ZSocket, open_socket

log = logging.getLogger("vajra.scheduler.swaps")

#: The longest a scheduler waits for the executors' replies to one swap.
MAX_WAIT_MS = 120_000
#: Swaps coordinated at once.
MAX_SWAPS = 1024
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(eq=False)
class _Swap:
    msg: AdapterSwap
    reply_to: Outbox
    peer: bytes
    pending: set[str]
    warmed: list[str] = field(default_factory=list)
    not_warmed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timer: trio.CancelScope = field(default_factory=trio.CancelScope)


class SwapCoordinator:
    """The scheduler's swaps in progress (see the module docstring).

    ``executors()`` lists the live executors' ids; ``to_executors`` is the dispatch outbox.
    Handlers only add to outboxes: the caller flushes them after each pass, and so does the
    timer task that ends a swap whose executors did not all answer.
    """

    def __init__(
        self,
        counters: Counter[str],
        executors: Callable[[], Iterable[str]],
        to_executors: Outbox,
        flush: Callable[[], Awaitable[None]],
    ) -> None:
        self.counters = counters
        self._executors = executors
        self._to_executors = to_executors
        self._flush = flush
        self._nursery: trio.Nursery | None = None
        self.swaps: dict[str, _Swap] = {}

    async def run(self) -> None:
        """Own the timers of the swaps in progress until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def start(self, msg: AdapterSwap, reply_to: Outbox, peer: bytes) -> None:
        """Begin ``msg``: ask every live executor to warm; answer at once when none is live,
        the message is malformed, or too many swaps run."""
        self.counters["swaps"] += 1
        if msg.swap_id in self.swaps:
            self.counters["swaps_duplicate"] += 1
            return
        problem = _problem(msg)
        if problem is None and (len(self.swaps) >= MAX_SWAPS or self._nursery is None):
            problem = "too many swaps in progress; the pointer may flip unwarmed"
        if problem is not None:
            self.counters["swaps_refused"] += 1
            done = AdapterSwapDone(msg.swap_id, ok=False, error=problem)
            reply_to.add(encode(done), peer)
            return
        wait_ms = min(max(0, msg.wait_ms), MAX_WAIT_MS)
        swap = _Swap(msg, reply_to, peer, set(self._executors()))
        if not swap.pending:
            self._finish(swap)
            return
        self.swaps[msg.swap_id] = swap
        warm = encode(
            AdapterWarm(
                msg.swap_id, msg.from_digest, msg.to_digest, msg.to_object_key, now_ms() + wait_ms
            )
        )
        for executor_id in sorted(swap.pending):
            self._to_executors.add(warm, executor_id.encode())
        swap.timer.deadline = trio.current_time() + wait_ms / 1000.0
        assert self._nursery is not None
        self._nursery.start_soon(self._expire, swap)

    def on_warmed(self, msg: AdapterWarmed) -> None:
        """One executor's answer; the swap ends when it was the last one awaited."""
        swap = self.swaps.get(msg.swap_id)
        if swap is None or msg.executor_id not in swap.pending:
            self.counters["swap_replies_dropped"] += 1  # late, duplicate, or not asked
            return
        swap.pending.discard(msg.executor_id)
        if msg.held_old and msg.loaded:
            swap.warmed.append(msg.executor_id)
        elif msg.held_old or msg.error:
            swap.not_warmed.append(msg.executor_id)
            swap.errors.append(f"{msg.executor_id}: {msg.error or 'not loaded'}")
        if not swap.pending:
            self._finish(swap)

    def executor_lost(self, executor_id: str) -> None:
        """An executor stopped reporting: no swap waits for it any more."""
        for swap in list(self.swaps.values()):
            if executor_id in swap.pending:
                swap.pending.discard(executor_id)
                swap.not_warmed.append(executor_id)
                swap.errors.append(f"{executor_id}: lost during the warm")
                if not swap.pending:
                    self._finish(swap)

    async def _expire(self, swap: _Swap) -> None:
        with swap.timer:
            await trio.sleep_forever()
        if swap.msg.swap_id in self.swaps and swap.pending:  # the wait ran out
            self.counters["swaps_timed_out"] += 1
            swap.not_warmed.extend(sorted(swap.pending))
            swap.errors.append(f"no answer in {swap.msg.wait_ms} ms: {sorted(swap.pending)}")
            swap.pending.clear()
            self._finish(swap)
            await self._flush()

    def _finish(self, swap: _Swap) -> None:
        self.swaps.pop(swap.msg.swap_id, None)
        swap.timer.cancel()
        ok = not swap.not_warmed
        self.counters["swaps_warmed" if ok else "swaps_not_warmed"] += 1
        done = AdapterSwapDone(
            swap.msg.swap_id,
            ok=ok,
            warmed=sorted(swap.warmed),
            not_warmed=sorted(swap.not_warmed),
            error="; ".join(swap.errors)[:2000],
        )
        swap.reply_to.add(encode(done), swap.peer)


def _problem(msg: AdapterSwap) -> str | None:
    if not msg.swap_id or len(msg.swap_id) > 128:
        return "swap_id must be 1-128 characters"
    if not _DIGEST_RE.fullmatch(msg.to_digest):
        return "to_digest must be 64 lowercase hex characters"
    if msg.from_digest and not _DIGEST_RE.fullmatch(msg.from_digest):
        return "from_digest must be empty or 64 lowercase hex characters"
    return None


# --- the requester's side -----------------------------------------------------------------


@dataclass(eq=False)
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    reply: AdapterSwapDone | None = None


class SwapWaiters:
    """Requesters' swaps awaiting :class:`AdapterSwapDone`, by swap id."""

    def __init__(self) -> None:
        self._waiting: dict[str, _Waiter] = {}

    async def request(
        self,
        send: Callable[[Sequence[bytes]], Awaitable[None]],
        swap: AdapterSwap,
        timeout_s: float,
    ) -> AdapterSwapDone:
        """Send ``swap`` with ``send`` and wait (at most ``timeout_s``) for its answer.

        Never raises for a missing answer: past ``timeout_s`` it returns ``ok=False`` with an
        error saying so (the caller flips anyway, unwarmed). Cancellation forgets the swap;
        a late answer is then dropped.
        """
        waiter = self._waiting[swap.swap_id] = _Waiter()
        try:
            await send(encode(swap))
            with trio.move_on_after(timeout_s):
                await waiter.done.wait()
        finally:
            self._waiting.pop(swap.swap_id, None)
        if waiter.reply is None:
            return AdapterSwapDone(
                swap.swap_id, ok=False, error=f"the scheduler did not answer in {timeout_s:g}s"
            )
        return waiter.reply

    def deliver(self, done: AdapterSwapDone) -> bool:
        """Hand an answer to its waiter; False when nobody waits for it (late: dropped)."""
        waiter = self._waiting.get(done.swap_id)
        if waiter is None or waiter.reply is not None:
            return False
        waiter.reply = done
        waiter.done.set()
        return True


class SwapClient:
    """A gateway's own DEALER to the scheduler's frontend, for swaps only (see the module
    docstring). Run :meth:`serve` in a nursery; :meth:`request` works while it runs."""

    def __init__(self, ctx: Any, address: str, identity: str) -> None:
        """``ctx``: the actor's ZeroMQ context (:func:`vajra.bus.new_context`)."""
        self.address = address
        self.sock: ZSocket = open_socket(
            ctx, bus.DEALER, identity=f"{identity}.swaps.{uuid.uuid4().hex[:8]}".encode()
        )
        self.waiters = SwapWaiters()
        self.dropped = 0

    async def serve(self) -> None:
        """Connect, then hand every answer to its waiter until cancelled; closes the socket."""
        try:
            self.sock.connect(self.address)
            while True:
                for frames in await self.sock.recv_batch(64):
                    for env, _ in decode_many(frames):
                        if isinstance(env, DecodeError) or not isinstance(
                            env.message, AdapterSwapDone
                        ):
                            self.dropped += 1
                            continue
                        if not self.waiters.deliver(env.message):
                            self.dropped += 1
        finally:
            self.sock.close()

    async def request(self, swap: AdapterSwap, timeout_s: float) -> AdapterSwapDone:
        return await self.waiters.request(self.sock.send, swap, timeout_s)
