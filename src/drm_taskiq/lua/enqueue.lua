-- Add a job. Atomic: the job hash, its place in wait or delayed, and the wake-up marker.
-- KEYS: 1 job hash, 2 wait zset, 3 delayed zset, 4 fair-queuing times (hash), 5 marker list,
--       6 dedup key,
--       7 the tenant's enqueue counter for the current second
-- ARGV: 1 job id, 2 now (ms), 3 delay (ms), 4 priority, 5 dedup ttl (ms, 0 = none),
--       6 the tenant's enqueue limit per second (0 = none), 7.. field/value pairs for the hash
-- (vtime() comes from fair.lua.)
-- Returns {1, "waiting"|"delayed"} for a new job, {0, state} when the id already exists,
-- {-1, count} when the tenant is over its rate limit (nothing is written but the counter).
local state = redis.call('HGET', KEYS[1], 'state')
if state then return {0, state} end
local limit = tonumber(ARGV[6])
if limit > 0 then
  local count = redis.call('INCR', KEYS[7])
  if count == 1 then redis.call('PEXPIRE', KEYS[7], 2000) end
  if count > limit then return {-1, tostring(count)} end
end
local dedup_ttl = tonumber(ARGV[5])
if dedup_ttl > 0 then
  if not redis.call('SET', KEYS[6], '1', 'NX', 'PX', dedup_ttl) then return {0, 'finished'} end
end
local now = tonumber(ARGV[2])
local delay = tonumber(ARGV[3])
local pri = tonumber(ARGV[4])
local fields = {}
local tenant = ''
for i = 7, #ARGV do
  fields[#fields + 1] = ARGV[i]
  if ARGV[i] == 'tenant' and i % 2 == 1 then tenant = ARGV[i + 1] end
end
redis.call('HSET', KEYS[1], 'ts', now, 'attempts', 0, 'stalled', 0, 'pri', pri, unpack(fields))
if delay > 0 then
  redis.call('HSET', KEYS[1], 'state', 'delayed', 'due', now + delay)
  redis.call('ZADD', KEYS[3], now + delay, ARGV[1])
  redis.call('LPUSH', KEYS[5], '0')
  redis.call('LTRIM', KEYS[5], 0, 999)
  return {1, 'delayed'}
end
local seq = vtime(KEYS[4], tenant)
redis.call('HSET', KEYS[1], 'state', 'waiting', 'seq', seq)
redis.call('ZADD', KEYS[2], pri * 4294967296 + seq % 4294967296, ARGV[1])
redis.call('LPUSH', KEYS[5], '1')
redis.call('LTRIM', KEYS[5], 0, 999)
return {1, 'waiting'}
