"""The adapter registry's Lua scripts (:mod:`vajra.state.adapters` runs them; no I/O here).

Version keys are built inside the scripts from the name key (``<name key>:v:<version>``), so
each update is one script even though the new version number is only known there. A version
hash holds ``staged = 1`` from a registration that did not activate it until it first becomes
active; the name hash's ``active`` field is the active pointer.
"""

from __future__ import annotations

__all__ = ["ACTIVATE_LUA", "DELETE_LUA", "REGISTER_LUA", "RESOLVE_LUA"]

# KEYS: names set, name hash, refs hash, versions zset
# ARGV: name, created_ms, digest, max names, max versions (0: no limit), activate ('1'/'0'),
# parent ('' = the active version, if any), then the version hash's field/value pairs.
# Returns the new version, or -1 (the tenant holds max names already and this is a new one)
# or -2 (this name holds max versions already).
REGISTER_LUA = """
local max_names, max_versions = tonumber(ARGV[4]), tonumber(ARGV[5])
if max_names > 0 and redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0
   and redis.call('SCARD', KEYS[1]) >= max_names then
  return -1
end
if max_versions > 0 and redis.call('ZCARD', KEYS[4]) >= max_versions then
  return -2
end
local parent = ARGV[7]
if parent == '' then parent = redis.call('HGET', KEYS[2], 'active') or '' end
local v = redis.call('HINCRBY', KEYS[2], 'last_version', 1)
if redis.call('HEXISTS', KEYS[2], 'created_ms') == 0 then
  redis.call('HSET', KEYS[2], 'created_ms', ARGV[2])
end
local vkey = KEYS[2] .. ':v:' .. v
redis.call('HSET', vkey, 'version', v, 'parent_version', parent, unpack(ARGV, 8))
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[2], 'active', v)
else
  redis.call('HSET', vkey, 'staged', '1')
end
redis.call('ZADD', KEYS[4], v, v)
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
return v
"""

# KEYS: name hash, versions zset; ARGV: version, expected active version ('' = any,
# '0' = none). Returns {status, active before, row...}: status 1 = now active (row: the
# version hash as a flat list), -1 = no such version, -2 = the active version is not the
# expected one (nothing written).
ACTIVATE_LUA = """
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return {-1, ''} end
local active = redis.call('HGET', KEYS[1], 'active') or '0'
if ARGV[2] ~= '' and ARGV[2] ~= active then return {-2, active} end
local vkey = KEYS[1] .. ':v:' .. ARGV[1]
redis.call('HSET', KEYS[1], 'active', ARGV[1])
redis.call('HDEL', vkey, 'staged')
local out = {1, active}
for _, x in ipairs(redis.call('HGETALL', vkey)) do table.insert(out, x) end
return out
"""

# KEYS: name hash, versions zset; ARGV: version ('' = the active one)
# Returns the version hash as a flat field/value list (empty if there is none).
RESOLVE_LUA = """
local v = ARGV[1]
if v == '' then
  v = redis.call('HGET', KEYS[1], 'active')
  if not v then return {} end
end
if not redis.call('ZSCORE', KEYS[2], v) then return {} end
local row = redis.call('HGETALL', KEYS[1] .. ':v:' .. v)
table.insert(row, 'active')
table.insert(row, redis.call('HGET', KEYS[1], 'active') or '0')
return row
"""

# KEYS: names set, name hash, refs hash, versions zset; ARGV: name, version ('' = all)
# Returns {n, row1_json..., '', freed digests...}: the deleted versions' hashes (as JSON
# objects) then the digests whose reference count reached zero. n = 0: nothing matched.
# When the active version goes, the newest remaining version that was ever active becomes
# active (the newest staged one if none was).
DELETE_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {0} end
local versions
if ARGV[2] == '' then
  versions = redis.call('ZRANGE', KEYS[4], 0, -1)
else
  if not redis.call('ZSCORE', KEYS[4], ARGV[2]) then return {0} end
  versions = {ARGV[2]}
end
local active = redis.call('HGET', KEYS[2], 'active')
local out = {#versions}
local freed = {}
for _, v in ipairs(versions) do
  local vkey = KEYS[2] .. ':v:' .. v
  local row = redis.call('HGETALL', vkey)
  local obj = {}
  for i = 1, #row, 2 do obj[row[i]] = row[i + 1] end
  obj['active'] = active or '0'
  table.insert(out, cjson.encode(obj))
  redis.call('DEL', vkey)
  redis.call('ZREM', KEYS[4], v)
  if obj['digest'] then
    local n = redis.call('HINCRBY', KEYS[3], obj['digest'], -1)
    if n <= 0 then
      redis.call('HDEL', KEYS[3], obj['digest'])
      table.insert(freed, obj['digest'])
    end
  end
end
local remaining = redis.call('ZRANGE', KEYS[4], 0, -1)
if #remaining == 0 then
  redis.call('DEL', KEYS[2], KEYS[4])
  redis.call('SREM', KEYS[1], ARGV[1])
elseif active and redis.call('ZSCORE', KEYS[4], active) then
  -- the active version stays
elseif active then
  local pick = remaining[#remaining]
  for i = #remaining, 1, -1 do
    if redis.call('HEXISTS', KEYS[2] .. ':v:' .. remaining[i], 'staged') == 0 then
      pick = remaining[i]
      break
    end
  end
  redis.call('HSET', KEYS[2], 'active', pick)
  redis.call('HDEL', KEYS[2] .. ':v:' .. pick, 'staged')
end
table.insert(out, '')
for _, d in ipairs(freed) do table.insert(out, d) end
return out
"""
