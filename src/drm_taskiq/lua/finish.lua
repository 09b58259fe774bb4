-- Settle attempts of leased jobs, one or many per call. Only the lease holder (same token, still
-- active) may settle a job; each job is settled independently of the others in the call.
-- KEYS: 1 active, 2 wait, 3 delayed, 4 ledger stream, 5 marker, 6 dead list,
--       7 circuit-breaker failure counts (hash), 8 paused (tenant:plugin set),
--       9 jobs running per tenant (hash)
-- ARGV: 1 now (ms), 2 consecutive failed attempts that pause a (tenant, plugin) (0 = never),
--       3 job key prefix (job hashes share the queue's hash tag),
--       4 a JSON array with one array of strings per job: id, token,
--       outcome (completed|retry|failed|requeue|dead), value (returnvalue JSON for completed,
--       reason otherwise), due (ms, retry only), extra metadata JSON (merged into the ledger
--       entry), start time of the attempt (ms or '')
-- Returns one answer per job: 1 when settled, 2 when settled and this failure paused the
-- tenant's plugin (circuit breaker), 0 when the lease was lost.
-- Per job, one HMGET reads what the script needs up front (it writes none of those fields but
-- 'token', 'attempts' and 'processed', which it keeps track of) and one HSET writes the attempt.
local now = tonumber(ARGV[1])
local threshold = tonumber(ARGV[2])
local answers = {}
local freed = false
local retried = false
local breaker_empty  -- the failure-count hash has no field (nil: not asked yet)

-- One HSET of the attempt's fields: the new attempt count (when not already counted by
-- HINCRBY), the outcome's three fields, then the attempt's start time (when given).
local function record(jk, count, k1, v1, k2, v2, k3, v3, started)
  local fields = {k1, v1, k2, v2, k3, v3}
  if count then
    table.insert(fields, 1, 'attempts')
    table.insert(fields, 2, count)
  end
  if started ~= '' then
    fields[#fields + 1] = 'processed'
    fields[#fields + 1] = started
  end
  redis.call('HSET', jk, unpack(fields))
end

local function settle(jk, id, token, outcome, value, due, extra, started)
  -- 'processed' is read only when this call does not set it; 'msg' only when the ledger
  -- entry carries it.
  local f
  if started ~= '' then
    f = redis.call('HMGET', jk, 'token', 'tenant', 'plugin', 'job', 'ts', 'progress', 'gen',
      'attempts')
  else
    f = redis.call('HMGET', jk, 'token', 'tenant', 'plugin', 'job', 'ts', 'progress', 'gen',
      'attempts', 'processed')
  end
  if f[1] ~= token then return 0 end
  if redis.call('ZREM', KEYS[1], id) == 0 then return 0 end
  redis.call('HDEL', jk, 'token')
  local who = f[2] or ''
  if redis.call('HINCRBY', KEYS[9], who, -1) <= 0 then redis.call('HDEL', KEYS[9], who) end
  freed = true
  if outcome == 'requeue' then
    local p = redis.call('HMGET', jk, 'pri', 'seq')
    redis.call('HSET', jk, 'state', 'waiting', 'ready', now)
    redis.call('ZADD', KEYS[2], tonumber(p[1]) * 4294967296 + tonumber(p[2]) % 4294967296, id)
    return 1
  end
  -- The new attempt count is written by the HSET below when the stored one is a plain integer
  -- small enough to stay exact (or missing: 0); any other value is left to HINCRBY, with its
  -- own checks and errors.
  local attempts
  local count = f[8]
  if not count then
    attempts = 1
  elseif count == '0' or (#count < 14 and string.find(count, '^[1-9]%d*$')) then
    attempts = tonumber(count) + 1
  end
  local counted = attempts
  if not attempts then attempts = redis.call('HINCRBY', jk, 'attempts', 1) end
  local status = 'error'
  local final = 1
  local state
  if outcome == 'completed' then
    status = 'success'
    state = 'completed'
    record(jk, counted, 'state', state, 'rv', value, 'finished', now, started)
  elseif outcome == 'retry' then
    final = 0
    state = 'delayed'
    record(jk, counted, 'state', state, 'reason', value, 'due', due, started)
    redis.call('ZADD', KEYS[3], tonumber(due), id)
    retried = true
  else
    state = 'failed'
    record(jk, counted, 'state', state, 'reason', value, 'finished', now, started)
    if outcome == 'dead' then
      -- Kept in Redis with its message for an operator (not final: the ledger never deletes it).
      redis.call('RPUSH', KEYS[6], id)
      final = 0
    end
  end
  if started == '' then started = f[9] end
  local entry = {
    id = id, plugin = f[3], tenant = f[2], job = f[4], ts = f[5],
    started = started, at = now, attempt = attempts, status = status,
    state = state, final = final, outcome = outcome,
    value = value, progress = f[6], extra = extra, gen = tonumber(f[7] or '0')
  }
  if final == 1 and status == 'error' then entry['msg'] = redis.call('HGET', jk, 'msg') end
  redis.call('XADD', KEYS[4], '*', 'e', cjson.encode(entry))
  if threshold > 0 and f[3] and f[2] and f[3] ~= '' and f[2] ~= '' then
    local pair = f[2] .. ':' .. f[3]
    if status == 'success' then
      -- HDEL of a field of an empty (missing) hash changes nothing: skip it then.
      if breaker_empty == nil then breaker_empty = redis.call('HLEN', KEYS[7]) == 0 end
      if not breaker_empty then redis.call('HDEL', KEYS[7], pair) end
    else
      breaker_empty = false
      if redis.call('HINCRBY', KEYS[7], pair, 1) >= threshold then
        if redis.call('SADD', KEYS[8], pair) == 1 then return 2 end
      end
    end
  end
  return 1
end

for _, job in ipairs(cjson.decode(ARGV[4])) do
  answers[#answers + 1] = settle(ARGV[3] .. job[1], job[1], job[2], job[3], job[4], job[5],
    job[6], job[7])
end
-- The wake-up marker keeps its newest 1,000 entries (LTRIM only when a push made it longer).
local markers = 0
if retried then
  markers = redis.call('LPUSH', KEYS[5], '0')
end
if freed and redis.call('ZCARD', KEYS[2]) > 0 then
  -- Jobs are waiting (given back, or skipped while their tenant was at its limit): wake a worker.
  markers = redis.call('LPUSH', KEYS[5], '1')
end
if markers > 1000 then redis.call('LTRIM', KEYS[5], 0, 999) end
return answers
