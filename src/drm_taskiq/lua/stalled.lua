-- Return jobs whose lease expired to waiting, or fail them after too many stalls.
-- Runs in one worker at a time: the lock key is taken for the check interval.
-- KEYS: 1 active, 2 wait, 3 lock, 4 ledger stream, 5 marker, 6 jobs running per tenant (hash)
-- ARGV: 1 now (ms), 2 max stalled count, 3 lock token, 4 lock ttl (ms), 5 job key prefix
-- Returns {-1} when another worker holds the lock, else a flat list of
-- (id, action 'requeued'|'failed', plugin, tenant, attempt number of the stalled attempt).
if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', tonumber(ARGV[4])) then return {-1} end
local now = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local jk = ARGV[5] .. id
  if redis.call('EXISTS', jk) == 1 then
    redis.call('HDEL', jk, 'token')
    local who = redis.call('HGET', jk, 'tenant') or ''
    if redis.call('HINCRBY', KEYS[6], who, -1) <= 0 then redis.call('HDEL', KEYS[6], who) end
    local stalled = redis.call('HINCRBY', jk, 'stalled', 1)
    if stalled > max then
      local attempts = redis.call('HINCRBY', jk, 'attempts', 1)
      local reason = 'job stalled more than allowable limit'
      redis.call('HSET', jk, 'state', 'failed', 'reason', reason, 'finished', ARGV[1])
      local f = redis.call('HMGET', jk, 'plugin', 'tenant', 'job', 'ts', 'processed', 'progress',
        'gen', 'msg')
      local entry = {
        id = id, plugin = f[1], tenant = f[2], job = f[3], ts = f[4],
        started = f[5], at = ARGV[1], attempt = attempts, status = 'error',
        state = 'failed', final = 1, outcome = 'stalled', value = reason,
        progress = f[6], extra = '{}', gen = tonumber(f[7] or '0'), msg = f[8]
      }
      redis.call('XADD', KEYS[4], '*', 'e', cjson.encode(entry))
      for _, v in ipairs({id, 'failed', f[1] or '', f[2] or '', attempts}) do out[#out + 1] = v end
    else
      local f = redis.call('HMGET', jk, 'pri', 'seq')
      redis.call('HSET', jk, 'state', 'waiting', 'ready', ARGV[1])
      redis.call('ZADD', KEYS[2], tonumber(f[1]) * 4294967296 + tonumber(f[2]) % 4294967296, id)
      redis.call('LPUSH', KEYS[5], '1')
      local g = redis.call('HMGET', jk, 'plugin', 'tenant', 'attempts')
      local attempt = tonumber(g[3] or '0') + 1
      for _, v in ipairs({id, 'requeued', g[1] or '', g[2] or '', attempt}) do out[#out + 1] = v end
    end
  end
end
redis.call('LTRIM', KEYS[5], 0, 999)
return out
