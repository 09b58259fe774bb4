-- Add a job. Atomic: the job hash, its place in wait or delayed, and the wake-up marker.
-- KEYS: 1 job hash. The queue's other keys share its hash tag and are named from ARGV[1]
--       (fewer arguments to send: this script runs once per job): base:wait, base:delayed,
--       base:fair (fair-queuing times), base:marker, base:dedup:<id>, and
--       base:rate:<tenant>:<second> (the tenant's enqueue counter for the current second)
-- ARGV: 1 key base ("{prefix:queue}"), 2 job id, 3 now (ms), 4 delay (ms), 5 priority,
--       6 dedup ttl (ms, 0 = none), 7 the tenant's enqueue limit per second (0 = none),
--       8.. field/value pairs for the hash
-- (vtime() comes from fair.lua.)
-- Returns {1, "waiting"|"delayed"} for a new job, {0, state} when the id already exists,
-- {-1, count} when the tenant is over its rate limit (nothing is written but the counter).
local base = ARGV[1]
local id = ARGV[2]
local wait, delayed, fair, marker = base .. ':wait', base .. ':delayed', base .. ':fair',
  base .. ':marker'
local state = redis.call('HGET', KEYS[1], 'state')
if state then return {0, state} end
local now = tonumber(ARGV[3])
local fields = {}
local tenant = ''
for i = 8, #ARGV do
  fields[#fields + 1] = ARGV[i]
  if ARGV[i] == 'tenant' and i % 2 == 0 then tenant = ARGV[i + 1] end
end
local limit = tonumber(ARGV[7])
if limit > 0 then
  local counter = base .. ':rate:' .. tenant .. ':' .. math.floor(now / 1000)
  local count = redis.call('INCR', counter)
  if count == 1 then redis.call('PEXPIRE', counter, 2000) end
  if count > limit then return {-1, tostring(count)} end
end
local dedup_ttl = tonumber(ARGV[6])
if dedup_ttl > 0 then
  if not redis.call('SET', base .. ':dedup:' .. id, '1', 'NX', 'PX', dedup_ttl) then
    return {0, 'finished'}
  end
end
local delay = tonumber(ARGV[4])
local pri = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'ts', now, 'attempts', 0, 'stalled', 0, 'pri', pri, unpack(fields))
if delay > 0 then
  redis.call('HSET', KEYS[1], 'state', 'delayed', 'due', now + delay)
  redis.call('ZADD', delayed, now + delay, id)
  redis.call('LPUSH', marker, '0')
  redis.call('LTRIM', marker, 0, 999)
  return {1, 'delayed'}
end
local seq = vtime(fair, tenant)
redis.call('HSET', KEYS[1], 'state', 'waiting', 'seq', seq)
redis.call('ZADD', wait, pri * 4294967296 + seq % 4294967296, id)
redis.call('LPUSH', marker, '1')
redis.call('LTRIM', marker, 0, 999)
return {1, 'waiting'}
