"""The executor's work intake: what arrives from the scheduler, and what becomes of it.

Data flows left to right::

    scheduler ─InferWork─▶ intake ─(adapter acquired through the tiers)─▶ step loop
              ─CancelWork / GatewayHello─▶ intake ─cancel─▶ step loop
              ─AdapterTierCommand─▶ intake ─promote / demote─▶ tiers
              ─AdapterForecasts─▶ intake ─▶ tiers (which idle adapter an eviction picks)
              ─JobOffer─▶ intake ─▶ the job runner (claims that training job)
              ─AdapterWarm─▶ intake ─promote into the old version's tier─▶ tiers
    intake ─AdapterWarmed─▶ scheduler      (the hot swap: vajra.actors.scheduler_swaps)

A request is refused at once (a typed error) while the executor drains, when its queue is full
(``executor.max_queue``: retriable "overloaded") or its usage outbox is (the ledger is
behind), when its decoding parameters are invalid (the engine's
:class:`~vajra.policies.decoding.SamplingParams` is built here) or when it names an adapter
that this executor cannot serve. A request for an adapter waits in its own task while the
tiers make the adapter resident and hold its slot; every failure of that load (its deadline
passing included) becomes that request's typed error.

Ending early: a request cancelled by its caller (``CancelWork``) or sent by an earlier
incarnation of its gateway (``GatewayHello``: nobody can receive its tokens any more) is
dropped wherever it is — waiting for its adapter, queued or running — and answers nothing.

Hot swap: an ``AdapterWarm`` makes an executor that holds the old version (GPU memory, else
host memory) load the new one into that tier before the pointer flips, through the tiers'
promotion path (a free slot, or an idle adapter's; never one running requests hold), bounded
by the warm's deadline; the answer says whether it held the old one and loaded the new one,
or why not. Failures are answered, never fatal. ``AdapterSwapDone`` answers this executor's
own swaps (a finished training job): :attr:`Intake.swaps`. Every request with an adapter is
counted ``adapter_requests_warm`` (resident in GPU memory when it arrived) or
``adapter_requests_cold`` (it had to be loaded): what shows a swap was warm.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import trio

from vajra.actors.adapter_tiers import AdapterTiers
from vajra.actors.base import now_ms
from vajra.actors.executor_steps import StepLoop
from vajra.actors.scheduler_swaps import SwapWaiters
from vajra.bus.codec import DecodeError, decode_many, encode
from vajra.bus.messages import (
    AdapterForecasts,
    AdapterSwapDone,
    AdapterTierCommand,
    AdapterWarm,
    AdapterWarmed,
    CancelWork,
    GatewayHello,
    InferWork,
    JobOffer,
)
from vajra.bus.zsocket import ZSocket
from vajra.config import VajraConfig
from vajra.errors import (
    InternalError,
    InvalidRequest,
    OverloadedError,
    TimeoutError,
    UnavailableError,
    VajraError,
)
from vajra.policies.decoding import SamplingParams

log = logging.getLogger("vajra.executor")


class Intake:
    """Takes work off the scheduler's socket and hands it to the step loop (see module doc)."""

    def __init__(
        self,
        cfg: VajraConfig,
        steps: StepLoop,
        tiers: AdapterTiers | None,
        counters: Counter[str],
        *,
        executor_id: str = "",
    ) -> None:
        self.cfg = cfg
        self.executor_id = executor_id
        self.swaps = SwapWaiters()  # this executor's own swaps (see the module docstring)
        self._work_in: ZSocket | None = None
        self.steps = steps
        self.tiers = tiers
        self.counters = counters
        #: Refuse new work (retriable): the executor is shutting down.
        self.draining = False
        self.adapter_waits = 0  # requests waiting for their adapter to load
        self._waiting_ids: set[str] = set()  # ... by request id
        self._cancelled_waits: set[str] = set()  # ... of those, the ones cancelled meanwhile
        self._gateways: dict[str, str] = {}  # gateway id -> its latest incarnation
        #: Where the scheduler's training-job offers go (the job runner; None: no training).
        self.job_offers: Callable[[str], None] | None = None

    def queue_depth(self) -> int:
        """Requests accepted and not yet running."""
        return self.steps.queue_depth() + self.adapter_waits

    def _full(self) -> bool:
        """Batch and queue are both taken: queued (here or waiting for an adapter) plus
        running reach ``max_batch_size + max_queue``, the capacity the scheduler places by. A
        queue past ``max_queue`` while batch seats are free (a request finished, the next
        not yet in the batch) is not full: those requests take the seats at the next step."""
        held = self.queue_depth()
        if held < self.cfg.executor.max_queue:
            return False
        engine = self.steps.engine
        return held + engine.num_running() >= engine.max_batch_size + self.cfg.executor.max_queue

    def is_idle(self) -> bool:
        """Nothing held: no request waiting for an adapter, queued or running."""
        return self.steps.is_empty() and not self.adapter_waits

    async def run(self, work_in: ZSocket) -> None:
        """Receive and dispatch work until cancelled; adapter loads and tier commands run as
        tasks of this loop's own nursery."""
        batch_size = self.cfg.bus.recv_batch
        self._work_in = work_in
        async with trio.open_nursery() as nursery:
            while True:
                for frames in await work_in.recv_batch(batch_size):
                    self._dispatch(frames, nursery)
                await self.steps.replies.flush()

    def _dispatch(self, frames: list[bytes], nursery: trio.Nursery) -> None:
        for env, _ in decode_many(frames, max_body_bytes=self.cfg.bus.max_body_bytes):
            if isinstance(env, DecodeError):
                self.counters["malformed_frames"] += 1
                log.warning("dropped a malformed work frame: %s", env)
                continue
            message = env.message
            if isinstance(message, InferWork):
                if (params := self._accept(message)) is not None:
                    nursery.start_soon(self._accept_with_adapter, message, params)
            elif isinstance(message, CancelWork):
                for rid in message.request_ids:
                    self._cancel(rid)
            elif isinstance(message, GatewayHello):
                self._on_gateway_hello(message)
            elif isinstance(message, AdapterTierCommand):
                nursery.start_soon(self._on_tier_command, message)
            elif isinstance(message, AdapterWarm):
                nursery.start_soon(self._on_warm, message)
            elif isinstance(message, AdapterSwapDone):
                if not self.swaps.deliver(message):
                    self.counters["swap_replies_dropped"] += 1
            elif isinstance(message, AdapterForecasts):
                if self.tiers is not None and not self.tiers.forecasts.update(message):
                    self.counters["forecasts_malformed"] += 1
            elif isinstance(message, JobOffer):
                self.counters["job_offers"] += 1
                if self.job_offers is not None:
                    self.job_offers(message.job_id)
            else:
                self.counters["unexpected_kind"] += 1

    def _accept(self, work: InferWork) -> SamplingParams | None:
        """Queue ``work`` or answer it; its decoding parameters (built here, for the engine)
        when its adapter must be loaded first, else None."""
        steps = self.steps
        if self._orphaned(work):
            self.counters["orphaned_dropped"] += 1
            steps.mark_finished(work.request_id)
            return None
        if self.draining:
            error: VajraError = UnavailableError("the executor is shutting down; retry")
            steps.answer_error(work.request_id, error)
            return None
        if self._full():
            self.counters["overloaded"] += 1
            error = OverloadedError("executor queue is full; retry later")
            steps.answer_error(work.request_id, error)
            return None
        if steps.usage.backlogged():  # the ledger is behind: never drop usage, shed work
            self.counters["overloaded_usage"] += 1
            error = OverloadedError("usage not yet acknowledged by the ledger; retry later")
            steps.answer_error(work.request_id, error)
            return None
        try:
            params = work.sampling.params()
        except VajraError as exc:  # the gateway checked it too; never trust a peer blindly
            steps.answer_error(work.request_id, exc)
            return None
        self.counters["accepted"] += 1
        if work.adapter_digest is None:
            steps.queue(work, params=params)
            return None
        if self.tiers is None:
            error = InvalidRequest(
                "this executor serves no adapters (no LoRA pool)", field="adapter"
            )
            steps.answer_error(work.request_id, error)
            return None
        self.adapter_waits += 1
        self._waiting_ids.add(work.request_id)
        return params

    def _orphaned(self, work: InferWork) -> bool:
        """Sent by an earlier incarnation of its gateway: its answers can reach nobody."""
        latest = self._gateways.get(work.gateway_id)
        return latest is not None and work.gateway_incarnation != latest

    def _on_gateway_hello(self, hello: GatewayHello) -> None:
        if self._gateways.get(hello.gateway_id) == hello.incarnation:
            return
        self._gateways[hello.gateway_id] = hello.incarnation
        for work in self.steps.works():
            if self._orphaned(work):
                self.counters["orphaned_cancelled"] += 1
                self._cancel(work.request_id)
        # Requests still waiting for their adapter are checked when the load ends.

    def _cancel(self, request_id: str) -> None:
        """Drop a request, wherever it is; it sends nothing more (see the module docstring)."""
        if self.steps.cancel(request_id):
            return
        if request_id in self._waiting_ids:
            self._cancelled_waits.add(request_id)
            return
        self.counters["cancel_unknown"] += 1

    async def _accept_with_adapter(self, work: InferWork, params: SamplingParams) -> None:
        """Load the request's adapter through the tiers, hold its slot, then queue the request."""
        assert self.tiers is not None and work.adapter_digest is not None
        warm = work.adapter_digest in self.tiers.gpu
        self.counters["adapter_requests_warm" if warm else "adapter_requests_cold"] += 1
        try:
            remaining_s = (work.deadline_unix_ms - now_ms()) / 1000.0
            with trio.fail_after(max(0.001, remaining_s)):
                slot = await self.tiers.acquire(work.adapter_digest, work.adapter_object_key or "")
        except trio.TooSlowError:
            failed: VajraError | None = TimeoutError("deadline passed while loading its adapter")
        except VajraError as exc:
            failed = exc
        except Exception as exc:  # never let one request's adapter take the executor down
            log.exception("loading adapter %s failed", work.adapter_digest[:12])
            failed = InternalError(f"the adapter could not be loaded: {type(exc).__name__}")
        else:
            failed = None
        finally:
            self.adapter_waits -= 1
            self._waiting_ids.discard(work.request_id)
        cancelled = work.request_id in self._cancelled_waits or self._orphaned(work)
        self._cancelled_waits.discard(work.request_id)
        if cancelled:
            if failed is None:
                self.tiers.release(work.adapter_digest)
            self.steps.mark_finished(work.request_id)
            self.counters["cancelled_loading"] += 1
            return
        if failed is not None:
            self.steps.answer_error(work.request_id, failed)
            await self.steps.replies.flush()
            return
        self.steps.queue(work, slot, params)

    async def _on_tier_command(self, cmd: AdapterTierCommand) -> None:
        """Promote or demote an adapter; failures are counted and logged, never fatal."""
        if self.tiers is None:
            self.counters["tier_commands_ignored"] += 1
            return
        try:
            if cmd.action == "promote":
                if cmd.tier == "gpu" and not self.tiers.may_prefetch(
                    cmd.adapter_digest, cmd.expected_ms
                ):
                    self.counters["tier_promote_declined"] += 1  # would push out a sooner one
                    return
                with trio.fail_after(self.cfg.bus.rpc_timeout_s * 6):
                    await self.tiers.promote(cmd.adapter_digest, cmd.adapter_object_key, cmd.tier)
            elif cmd.action == "demote":
                self.tiers.demote(cmd.adapter_digest, cmd.tier)
            else:
                raise InvalidRequest(f"unknown tier action {cmd.action!r}", field="action")
        except (VajraError, trio.TooSlowError) as exc:
            self.counters["tier_commands_failed"] += 1
            log.warning("tier command %s %s failed: %s", cmd.action, cmd.adapter_digest[:12], exc)
            return
        except Exception:  # a bug in the tiers must not take the executor down
            self.counters["tier_commands_failed"] += 1
            log.exception("tier command %s %s failed", cmd.action, cmd.adapter_digest[:12])
            return
        self.counters[f"tier_{cmd.action}"] += 1

    async def _on_warm(self, warm: AdapterWarm) -> None:
        """Load the new version where the old one is held, then answer (module docstring)."""
        held, loaded, error = "", False, ""
        tiers = self.tiers
        if tiers is not None and warm.from_digest:
            if warm.from_digest in tiers.gpu:
                held = "gpu"
            elif warm.from_digest in tiers.host.entries:
                held = "host"
        if tiers is not None and held:
            try:
                with trio.fail_after(max(0.001, (warm.deadline_unix_ms - now_ms()) / 1000.0)):
                    await tiers.promote(warm.to_digest, warm.to_object_key, held)
                loaded = True
            except trio.TooSlowError:
                error = "the warm's deadline passed while loading"
            except VajraError as exc:
                error = str(exc)
            except Exception as exc:  # a bug in the tiers must not take the executor down
                log.exception("warming adapter %s failed", warm.to_digest[:12])
                error = f"internal error: {type(exc).__name__}"
        self.counters["swap_warms_loaded" if loaded else "swap_warms_skipped"] += 1
        if error:
            self.counters["swap_warms_failed"] += 1
            log.warning("warming adapter %s failed: %s", warm.to_digest[:12], error)
        reply = AdapterWarmed(warm.swap_id, self.executor_id, bool(held), loaded, held, error)
        if self._work_in is not None:
            await self._work_in.send(encode(reply))
