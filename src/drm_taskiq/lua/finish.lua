-- Settle one attempt of a leased job. Only the lease holder (same token, still active) may.
-- KEYS: 1 job hash, 2 active, 3 wait, 4 delayed, 5 ledger stream, 6 marker, 7 dead list,
--       8 circuit-breaker failure counts (hash), 9 paused (tenant:plugin set),
--       10 jobs running per tenant (hash)
-- ARGV: 1 id, 2 token, 3 outcome (completed|retry|failed|requeue|dead), 4 now (ms),
--       5 value (returnvalue JSON for completed, reason otherwise), 6 due (ms, retry only),
--       7 extra metadata JSON (merged into the ledger entry), 8 start time of the attempt (ms),
--       9 consecutive failed attempts that pause a (tenant, plugin) (0 = never)
-- Returns 1 when settled, 2 when settled and this failure paused the tenant's plugin,
-- 0 when the lease was lost.
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] then return 0 end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local outcome = ARGV[3]
local now = tonumber(ARGV[4])
redis.call('HDEL', KEYS[1], 'token')
local who = redis.call('HGET', KEYS[1], 'tenant') or ''
if redis.call('HINCRBY', KEYS[10], who, -1) <= 0 then redis.call('HDEL', KEYS[10], who) end
if redis.call('ZCARD', KEYS[3]) > 0 then
  -- A running slot of this tenant is free: wake a worker that skipped the tenant at its limit.
  redis.call('LPUSH', KEYS[6], '1')
  redis.call('LTRIM', KEYS[6], 0, 999)
end
if outcome == 'requeue' then
  local f = redis.call('HMGET', KEYS[1], 'pri', 'seq')
  redis.call('HSET', KEYS[1], 'state', 'waiting')
  redis.call('ZADD', KEYS[3], tonumber(f[1]) * 4294967296 + tonumber(f[2]) % 4294967296, ARGV[1])
  redis.call('LPUSH', KEYS[6], '1')
  redis.call('LTRIM', KEYS[6], 0, 999)
  return 1
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local status = 'error'
local final = 1
if outcome == 'completed' then
  status = 'success'
  redis.call('HSET', KEYS[1], 'state', 'completed', 'rv', ARGV[5], 'finished', ARGV[4])
elseif outcome == 'retry' then
  final = 0
  redis.call('HSET', KEYS[1], 'state', 'delayed', 'reason', ARGV[5], 'due', ARGV[6])
  redis.call('ZADD', KEYS[4], tonumber(ARGV[6]), ARGV[1])
  redis.call('LPUSH', KEYS[6], '0')
  redis.call('LTRIM', KEYS[6], 0, 999)
else
  redis.call('HSET', KEYS[1], 'state', 'failed', 'reason', ARGV[5], 'finished', ARGV[4])
  if outcome == 'dead' then
    -- Kept in Redis with its message for an operator (not final: the ledger never deletes it).
    redis.call('RPUSH', KEYS[7], ARGV[1])
    final = 0
  end
end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'processed', ARGV[8]) end
local f = redis.call('HMGET', KEYS[1], 'plugin', 'tenant', 'job', 'ts', 'processed', 'progress',
  'gen', 'msg')
local entry = {
  id = ARGV[1], plugin = f[1], tenant = f[2], job = f[3], ts = f[4],
  started = f[5], at = ARGV[4], attempt = attempts, status = status,
  state = redis.call('HGET', KEYS[1], 'state'), final = final, outcome = outcome,
  value = ARGV[5], progress = f[6], extra = ARGV[7], gen = tonumber(f[7] or '0')
}
if final == 1 and status == 'error' then entry['msg'] = f[8] end
redis.call('XADD', KEYS[5], '*', 'e', cjson.encode(entry))
local threshold = tonumber(ARGV[9] or '0')
if threshold > 0 and f[1] and f[2] and f[1] ~= '' and f[2] ~= '' then
  local pair = f[2] .. ':' .. f[1]
  if status == 'success' then
    redis.call('HDEL', KEYS[8], pair)
  elseif redis.call('HINCRBY', KEYS[8], pair, 1) >= threshold then
    if redis.call('SADD', KEYS[9], pair) == 1 then return 2 end
  end
end
return 1
