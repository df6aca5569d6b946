"""Executor heartbeats in Redis: what each executor publishes about itself, with a TTL.

Each executor writes ``vajra:executor:{id}`` (a hash that expires unless written again) and
adds its id to ``vajra:executors``; readers get the live ones and prune the ids whose hash has
expired. Errors: as :mod:`vajra.state.connection`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from vajra.errors import InvalidRequest
from vajra.state import keys
from vajra.state.connection import Connection, KeyOwner, translate_errors
from vajra.state.fields import check_id

__all__ = ["ExecutorHeartbeat", "Heartbeats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExecutorHeartbeat:
    """What an executor publishes about itself every heartbeat period."""

    executor_id: str
    incarnation: str
    model: str
    device: str
    free_memory_bytes: int
    queue_depth: int
    running: int
    resident_adapters: tuple[str, ...]
    max_batch_size: int
    updated_ms: int
    training_jobs: int = 0  # training jobs running there


# KEYS: executors set, then one executor hash per id in ARGV (same order)
_PRUNE_EXECUTORS_LUA = """
local removed = 0
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return removed
"""


def _heartbeat_to_hash(hb: ExecutorHeartbeat) -> dict[str, str]:
    return {
        "incarnation": hb.incarnation,
        "model": hb.model,
        "device": hb.device,
        "free_memory_bytes": str(hb.free_memory_bytes),
        "queue_depth": str(hb.queue_depth),
        "running": str(hb.running),
        "resident_adapters": json.dumps(list(hb.resident_adapters)),
        "max_batch_size": str(hb.max_batch_size),
        "updated_ms": str(hb.updated_ms),
        "training_jobs": str(hb.training_jobs),
    }


def _heartbeat_from_hash(executor_id: str, row: Mapping[str, str]) -> ExecutorHeartbeat:
    """Raises KeyError, ValueError or TypeError on a malformed hash."""
    adapters = json.loads(row["resident_adapters"])
    if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
        raise ValueError("resident_adapters is not a JSON list of strings")
    return ExecutorHeartbeat(
        executor_id=executor_id,
        incarnation=row["incarnation"],
        model=row["model"],
        device=row["device"],
        free_memory_bytes=int(row["free_memory_bytes"]),
        queue_depth=int(row["queue_depth"]),
        running=int(row["running"]),
        resident_adapters=tuple(adapters),
        max_batch_size=int(row["max_batch_size"]),
        updated_ms=int(row["updated_ms"]),
        training_jobs=int(row.get("training_jobs", "0")),  # absent: written by an older version
    )


class Heartbeats(KeyOwner):
    """Executors' heartbeats. Thread-safe; no I/O until used."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self._prune_lua = conn.script(_PRUNE_EXECUTORS_LUA)

    @translate_errors
    def write(self, hb: ExecutorHeartbeat, ttl_s: float) -> None:
        """Publish a heartbeat that expires after ``ttl_s`` unless written again."""
        check_id(hb.executor_id, "executor_id")
        if not (isinstance(ttl_s, int | float) and math.isfinite(ttl_s) and ttl_s > 0):
            raise InvalidRequest("ttl_s must be a positive number", field="ttl_s")
        key = keys.executor(hb.executor_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, mapping=cast("Mapping[str | bytes, str]", _heartbeat_to_hash(hb)))
        pipe.pexpire(key, max(1, round(ttl_s * 1000)))
        pipe.sadd(keys.executors(), hb.executor_id)
        pipe.execute()

    # Last: the method named ``list`` shadows the builtin for annotations below it.
    @translate_errors
    def list(self) -> list[ExecutorHeartbeat]:
        """Live heartbeats, sorted by executor id; ids whose heartbeat expired are pruned.

        A heartbeat hash that cannot be parsed is logged and skipped.
        """
        ids = sorted(self._r.smembers(keys.executors()))
        if not ids:
            return []
        pipe = self._r.pipeline(transaction=False)
        for executor_id in ids:
            pipe.hgetall(keys.executor(executor_id))
        rows: list[dict[str, str]] = pipe.execute()
        live: list[ExecutorHeartbeat] = []
        expired: list[str] = []
        for executor_id, row in zip(ids, rows, strict=True):
            if not row:
                expired.append(executor_id)
                continue
            try:
                live.append(_heartbeat_from_hash(executor_id, row))
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("skipping malformed heartbeat %s: %r", keys.executor(executor_id), exc)
        if expired:
            # Only ids whose hash is still gone are removed: an executor that came back
            # between the read above and this call keeps its entry.
            self._prune_lua(
                keys=[keys.executors(), *(keys.executor(e) for e in expired)], args=expired
            )
        return live
