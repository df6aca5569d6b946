"""The gateway's operations beside generation: tenant queries and administration (answered by
:class:`~vajra.actors.gateway_queries.QueryDesk`) and adapter push, list and delete (by
:class:`~vajra.actors.gateway_adapters.AdapterDesk`).

Each operation runs in a task of its own, so a slow one never holds up the client loop, and
each is answered through the client protocol: its reply, or its typed error. How many run at
once is bounded: ``MAX_QUERIES`` queries, ``MAX_QUERIES`` adapter operations of which at most
``adapters.max_concurrent_pushes`` uploads (each holds its files in memory); beyond that the
operation is answered ``overloaded`` at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import trio

from vajra.actors.gateway_adapters import AdapterDesk, AdapterOp
from vajra.actors.gateway_protocol import ClientProtocol
from vajra.actors.gateway_queries import Query, QueryDesk
from vajra.bus.messages import AdapterMerge, AdapterPush, Message
from vajra.config import VajraConfig
from vajra.errors import InvalidRequest, OverloadedError, UnavailableError
from vajra.policies.request_rules import check_id

#: Tenant queries and admin requests in flight at once, and adapter operations too.
MAX_QUERIES = 256


class Operations:
    """See the module docstring. ``accepting()`` is False once the gateway drains;
    ``spawn(fn, *args)`` starts a task in the gateway's nursery."""

    def __init__(
        self,
        cfg: VajraConfig,
        *,
        clients: ClientProtocol,
        queries: QueryDesk,
        adapters: AdapterDesk,
        counters: Counter[str],
        accepting: Callable[[], bool],
        spawn: Callable[..., None],
    ) -> None:
        self.cfg = cfg
        self.clients = clients
        self.queries = queries
        self.adapters = adapters
        self.counters = counters
        self._accepting = accepting
        self._spawn = spawn
        self._queries = 0
        self._adapter_ops = 0
        self._pushes = 0

    # --- tenant queries and administration --------------------------------------------------

    async def on_query(self, identity: bytes, msg: Query) -> None:
        """Start answering ``msg`` in its own task, or refuse it when too many run."""
        self.counters["queries"] += 1
        if self._queries >= MAX_QUERIES:
            self.counters["overloaded"] += 1
            await self.clients.reply_error(
                identity, msg.request_id, OverloadedError("too many queries in flight")
            )
            return
        self._queries += 1
        self._spawn(self._run_query, identity, msg)

    async def _run_query(self, identity: bytes, msg: Query) -> None:
        """Answer one query or admin request; Redis is reached in a worker thread, bounded."""
        try:
            await self.clients.reply_with(
                identity,
                msg.request_id,
                self.queries.answer(msg),
                timeout_s=self.cfg.bus.rpc_timeout_s,
            )
        finally:
            self._queries -= 1

    # --- adapters: push, list, delete -------------------------------------------------------

    async def on_adapter_op(self, identity: bytes, msg: AdapterOp, bulk: tuple[bytes, ...]) -> None:
        """Start one adapter operation in its own task, or refuse it at once when too many run."""
        self.counters[f"adapter_{msg.KIND}"] += 1
        if not self._accepting():
            await self.clients.reply_error(
                identity, msg.request_id, UnavailableError("the gateway is shutting down")
            )
            return
        is_push = isinstance(msg, AdapterPush | AdapterMerge)  # both validate and store
        if (is_push and self._pushes >= self.cfg.adapters.max_concurrent_pushes) or (
            self._adapter_ops >= MAX_QUERIES
        ):
            self.counters["overloaded"] += 1
            await self.clients.reply_error(
                identity,
                msg.request_id,
                OverloadedError("too many adapter operations in flight; retry later"),
            )
            return
        self._adapter_ops += 1
        self._pushes += is_push
        self._spawn(self._run_adapter_op, identity, msg, bulk, is_push)

    async def _run_adapter_op(
        self, identity: bytes, msg: AdapterOp, bulk: tuple[bytes, ...], is_push: bool
    ) -> None:
        try:
            await self.clients.reply_with(identity, msg.request_id, self._adapter_op(msg, bulk))
        finally:
            self._adapter_ops -= 1
            self._pushes -= is_push

    async def _adapter_op(self, msg: AdapterOp, bulk: tuple[bytes, ...]) -> Message:
        check_id(msg.request_id, "request_id")
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            tenant = await self.queries.tenant_of(msg.api_key)
        if msg.tenant is not None and msg.tenant not in (tenant.tenant_id, tenant.name):
            raise InvalidRequest(f"unknown tenant {msg.tenant!r}", field="tenant")
        return await self.adapters.handle(tenant, msg, bulk)
