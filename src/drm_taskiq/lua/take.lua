-- Promote due delayed jobs, then lease up to N waiting jobs, lowest (priority, seq) first.
-- KEYS: 1 wait zset, 2 delayed zset, 3 active zset, 4 seq counter, 5 marker list
-- ARGV: 1 now (ms), 2 lease (ms), 3 lease token, 4 max jobs, 5 job key prefix
-- Returns {{id, msg, attempts, stalled, created ts, ...}, next delayed due time (ms) or false}
local now = tonumber(ARGV[1])
local prefix = ARGV[5]
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(due) do
  local jk = prefix .. id
  local pri = tonumber(redis.call('HGET', jk, 'pri'))
  if pri then
    local seq = redis.call('INCR', KEYS[4]) % 4294967296
    redis.call('ZADD', KEYS[1], pri * 4294967296 + seq, id)
    redis.call('HSET', jk, 'state', 'waiting', 'seq', seq)
    redis.call('HDEL', jk, 'due')
  end
  redis.call('ZREM', KEYS[2], id)
end
local out = {}
local max = tonumber(ARGV[4])
if max > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[1], max)
  local deadline = now + tonumber(ARGV[2])
  for i = 1, #popped, 2 do
    local id = popped[i]
    local jk = prefix .. id
    local f = redis.call('HMGET', jk, 'msg', 'attempts', 'stalled', 'ts')
    if f[1] then
      redis.call('ZADD', KEYS[3], deadline, id)
      redis.call('HSET', jk, 'state', 'active', 'token', ARGV[3], 'processed', ARGV[1])
      out[#out + 1] = id
      out[#out + 1] = f[1]
      out[#out + 1] = f[2]
      out[#out + 1] = f[3]
      out[#out + 1] = f[4]
    end
  end
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #out == 0 and redis.call('ZCARD', KEYS[1]) == 0 then
  -- Nothing to take: stale wake-up markers would only cause empty takes. A job enqueued after
  -- this script pushes a fresh marker, so no wake-up is lost.
  redis.call('DEL', KEYS[5])
end
return {out, nxt[2] or false}
