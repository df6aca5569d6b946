"""Training-job records as stored in Redis: the dataclass, its hash encoding, the Lua scripts.

No I/O here: :mod:`vajra.state.jobs` runs the scripts. A hash that cannot be decoded raises
:class:`~vajra.errors.InternalError` ("a training job record is damaged").
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from vajra.errors import InternalError

__all__ = [
    "ACTIVE_STATUSES",
    "EXECUTOR_LOST",
    "TERMINAL_STATUSES",
    "JobRecord",
    "JobStatus",
    "decode_record",
    "encode_record",
    "flat_row",
    "new_job_id",
]

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE_STATUSES: frozenset[str] = frozenset({"queued", "running"})
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
EXECUTOR_LOST = "executor lost"
"""The error of a job whose executor stopped renewing its lease."""

_STATUSES: frozenset[str] = frozenset(get_args(JobStatus))


def new_job_id() -> str:
    """A fresh job id (``j_`` then 32 hex digits), unique across gateways and restarts."""
    return "j_" + secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One training job as stored. ``from_version`` None: a fresh adapter."""

    job_id: str
    tenant_id: str
    adapter: str
    base_model: str
    from_version: int | None  # None: a fresh adapter (params.rank/target_modules)
    params: dict[str, Any]  # TrainParams.to_dict()
    dataset_key: str  # object-store key of the JSONL
    dataset_digest: str
    status: JobStatus = "queued"
    created_ms: int = 0
    started_ms: int = 0
    finished_ms: int = 0
    executor_id: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float = 0.0
    tokens: int = 0
    gradients: int = 0
    cost_usd: float = 0.0
    checkpoint_key: str = ""  # "": none yet
    checkpoint_step: int = 0
    result_version: int | None = None
    error: str = ""
    attempt: int = 1
    cancel_requested: bool = False  # a running job asked to stop (seen by renew())
    queued_ms: int = 0  # when it was last queued (created, resumed or handed back)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (``params`` copied)."""
        out = asdict(self)
        out["params"] = dict(self.params)
        return out


_INT_FIELDS = frozenset(
    {
        "created_ms",
        "started_ms",
        "finished_ms",
        "step",
        "total_steps",
        "epoch",
        "tokens",
        "gradients",
        "checkpoint_step",
        "attempt",
        "queued_ms",
    }
)
_FLOAT_FIELDS = frozenset({"loss", "cost_usd"})
_OPT_INT_FIELDS = frozenset({"from_version", "result_version"})


def encode_record(rec: JobRecord) -> list[str]:
    out: list[str] = []
    for f in fields(JobRecord):
        value = getattr(rec, f.name)
        if f.name == "params":
            text = json.dumps(value, sort_keys=True, separators=(",", ":"))
        elif f.name in _OPT_INT_FIELDS:
            text = "" if value is None else str(int(value))
        elif f.name == "cancel_requested":
            text = "1" if value else "0"
        elif f.name in _FLOAT_FIELDS:
            text = repr(float(value))
        else:
            text = str(value)
        out += [f.name, text]
    return out


def decode_record(row: Mapping[str, str]) -> JobRecord:
    """A record from its hash; InternalError if the hash is damaged."""
    try:
        values: dict[str, Any] = {}
        for f in fields(JobRecord):
            text = row.get(f.name)
            if text is None:
                continue
            if f.name == "params":
                params = json.loads(text)
                if not isinstance(params, dict):
                    raise ValueError("params is not an object")
                values[f.name] = params
            elif f.name in _OPT_INT_FIELDS:
                values[f.name] = None if text == "" else int(text)
            elif f.name == "cancel_requested":
                values[f.name] = text == "1"
            elif f.name in _FLOAT_FIELDS:
                values[f.name] = float(text)
            elif f.name in _INT_FIELDS:
                values[f.name] = int(text)
            else:
                values[f.name] = text
        if values.get("status") not in _STATUSES:
            raise ValueError("unknown status")
        return JobRecord(**values)
    except (ValueError, TypeError) as exc:
        raise InternalError("a training job record is damaged") from exc


def flat_row(flat: list[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


# --- Lua scripts ----------------------------------------------------------------------------
# Keys built inside scripts: the job hash is ARGV-prefix .. job_id ("vajra:job:"), the
# executor's set is "vajra:jobs:executor:" .. executor_id. ARGV[1] of every script that needs
# them is the job hash prefix.

# KEYS: job hash, tenant index, tenant active set, queue
# ARGV: job_id, created_ms, max_active (0: none), index_limit, job-hash prefix, fields...
# Returns 1, or -1 (tenant at max_active), or -2 (job id taken).
CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -2 end
local max_active = tonumber(ARGV[3])
if max_active > 0 and redis.call('SCARD', KEYS[3]) >= max_active then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('LPUSH', KEYS[4], ARGV[1])
local limit = tonumber(ARGV[4])
local excess = redis.call('ZCARD', KEYS[2]) - limit
if limit > 0 and excess > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[2], 0, excess + 64)) do
    if excess <= 0 then break end
    local st = redis.call('HGET', ARGV[5] .. old, 'status')
    if st ~= 'queued' and st ~= 'running' then
      redis.call('DEL', ARGV[5] .. old)
      redis.call('ZREM', KEYS[2], old)
      excess = excess - 1
    end
  end
end
return 1
"""

# KEYS: queue, running zset; ARGV: job-hash prefix, executor_id, now_ms, lease deadline ms,
# executor-set prefix, scan limit, cutoff ms, job id or "".
# With a job id (an offer from placement): that job, if it is still queued. Without: the
# oldest queued job (from the queue's tail, at most scan-limit entries looked at) that was
# queued at or before the cutoff (jobs younger than ``placement_wait`` are left to placement);
# ids of jobs no longer queued are removed on the way. Returns that job's hash after the
# claim, or {}.
CLAIM_LUA = """
local function take(id)
  local jkey = ARGV[1] .. id
  redis.call('LREM', KEYS[1], 1, id)
  redis.call('HSET', jkey, 'status', 'running', 'executor_id', ARGV[2], 'cancel_requested', '0')
  if redis.call('HGET', jkey, 'started_ms') == '0' then
    redis.call('HSET', jkey, 'started_ms', ARGV[3])
  end
  redis.call('ZADD', KEYS[2], ARGV[4], id)
  redis.call('SADD', ARGV[5] .. ARGV[2], id)
  return redis.call('HGETALL', jkey)
end
if ARGV[8] ~= '' then
  if redis.call('HGET', ARGV[1] .. ARGV[8], 'status') ~= 'queued' then return {} end
  if not redis.call('LPOS', KEYS[1], ARGV[8]) then return {} end
  return take(ARGV[8])
end
local ids = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[6]), -1)
local cutoff = tonumber(ARGV[7])
for i = #ids, 1, -1 do
  local id = ids[i]
  local row = redis.call('HMGET', ARGV[1] .. id, 'status', 'queued_ms')
  if row[1] ~= 'queued' then
    redis.call('LREM', KEYS[1], 1, id)
  elseif (tonumber(row[2]) or 0) <= cutoff then
    return take(id)
  end
end
return {}
"""

# KEYS: job hash, running zset; ARGV: job_id, executor_id, lease deadline ms
RENEW_LUA = """
local row = redis.call('HMGET', KEYS[1], 'status', 'executor_id', 'cancel_requested')
if row[1] ~= 'running' or row[2] ~= ARGV[2] or row[3] == '1' then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# KEYS: job hash; ARGV: executor_id, field/value pairs. Writes only while running there.
UPDATE_LUA = """
local row = redis.call('HMGET', KEYS[1], 'status', 'executor_id')
if row[1] ~= 'running' or row[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

# KEYS: job hash, running zset, tenant active set, executor set
# ARGV: job_id, executor_id, status, now_ms, result_version, error
# Returns the hash (after the change, if it was ours).
FINISH_LUA = """
local row = redis.call('HMGET', KEYS[1], 'status', 'executor_id')
if row[1] == 'running' and row[2] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'status', ARGV[3], 'finished_ms', ARGV[4],
             'result_version', ARGV[5], 'error', ARGV[6])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('SREM', KEYS[4], ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: job hash, running zset, executor set, queue; ARGV: job_id, executor_id, now_ms
# A running job handed back by its executor (a drain): queued again at the front of the
# queue, attempt + 1, its checkpoint kept. Returns 1, or 0 (not running there, or cancelled).
REQUEUE_LUA = """
local row = redis.call('HMGET', KEYS[1], 'status', 'executor_id', 'cancel_requested')
if row[1] ~= 'running' or row[2] ~= ARGV[2] or row[3] == '1' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'executor_id', '', 'queued_ms', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[1])
return 1
"""

# KEYS: job hash, tenant active set, queue; ARGV: job_id, tenant_id, now_ms
# Returns the hash after the change, or {} (no such job for this tenant).
CANCEL_LUA = """
if redis.call('HGET', KEYS[1], 'tenant_id') ~= ARGV[2] then return {} end
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_ms', ARGV[3],
             'error', 'cancelled by the tenant')
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('LREM', KEYS[3], 0, ARGV[1])
elseif st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: job hash, tenant active set, queue; ARGV: job_id, tenant_id, max_active, now_ms
# Returns {code, hash...}: code 1 resumed, 0 not found, -1 at max_active, -2 wrong status,
# -3 no checkpoint.
RESUME_LUA = """
if redis.call('HGET', KEYS[1], 'tenant_id') ~= ARGV[2] then return {0} end
local row = redis.call('HMGET', KEYS[1], 'status', 'checkpoint_key')
local code = 1
if row[1] ~= 'failed' and row[1] ~= 'cancelled' then code = -2
elseif row[2] == '' or not row[2] then code = -3
else
  local max_active = tonumber(ARGV[3])
  if max_active > 0 and redis.call('SCARD', KEYS[2]) >= max_active then code = -1 end
end
if code == 1 then
  redis.call('HSET', KEYS[1], 'status', 'queued', 'executor_id', '', 'error', '',
             'finished_ms', '0', 'cancel_requested', '0', 'result_version', '',
             'queued_ms', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'attempt', 1)
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('LPUSH', KEYS[3], ARGV[1])
end
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, code)
return out
"""

# KEYS: running zset; ARGV: job-hash prefix, now_ms, batch, executor-set prefix,
# tenant-active prefix, tenant-active suffix, error
# Returns the ids marked failed.
EXPIRE_LUA = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])) do
  local jkey = ARGV[1] .. id
  local row = redis.call('HMGET', jkey, 'status', 'executor_id', 'tenant_id')
  redis.call('ZREM', KEYS[1], id)
  if row[1] == 'running' then
    redis.call('HSET', jkey, 'status', 'failed', 'finished_ms', ARGV[2], 'error', ARGV[7])
    if row[3] then redis.call('SREM', ARGV[5] .. row[3] .. ARGV[6], id) end
    table.insert(out, id)
  end
  if row[2] then redis.call('SREM', ARGV[4] .. row[2], id) end
end
return out
"""

# KEYS: tenant index, tenant active set, running zset; ARGV: job-hash prefix,
# queue prefix, executor-set prefix, tenant_id. Deletes every job of the tenant that the
# index reaches (checking the record's tenant) and its queue/lease entries.
# Returns the number of keys deleted.
PURGE_TENANT_LUA = """
local removed = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local jkey = ARGV[1] .. id
  local row = redis.call('HMGET', jkey, 'tenant_id', 'base_model', 'executor_id')
  if row[1] == ARGV[4] then
    if row[2] then redis.call('LREM', ARGV[2] .. row[2], 0, id) end
    if row[3] and row[3] ~= '' then redis.call('SREM', ARGV[3] .. row[3], id) end
    redis.call('ZREM', KEYS[3], id)
    removed = removed + redis.call('DEL', jkey)
  end
end
removed = removed + redis.call('DEL', KEYS[1], KEYS[2])
return removed
"""
