-- add_job(): shared by enqueue.lua and enqueue_many.lua (redis_queue.py prepends it, after
-- fair.lua, whose vtime() it uses).
-- base: the queue's key base ("{prefix:queue}"); the other keys share its hash tag:
--   base:wait, base:delayed, base:fair, base:dedup:<id>, base:rate:<tenant>:<second>
-- Returns {1, "waiting"|"delayed"} for a new job, {0, state} when the id exists (nothing is
-- changed; {0, "finished"} when only its dedup key is left), {-1, count} when the tenant is
-- over its rate limit (nothing is written but the counter). The caller pushes the wake-up marker.
local function add_job(base, jk, id, now, delay, pri, dedup_ttl, limit, fields)
  local state = redis.call('HGET', jk, 'state')
  if state then return {0, state} end
  local tenant = ''
  for i = 1, #fields, 2 do
    if fields[i] == 'tenant' then tenant = fields[i + 1] end
  end
  if limit > 0 then
    local counter = base .. ':rate:' .. tenant .. ':' .. math.floor(now / 1000)
    local count = redis.call('INCR', counter)
    if count == 1 then redis.call('PEXPIRE', counter, 2000) end
    if count > limit then return {-1, tostring(count)} end
  end
  if dedup_ttl > 0 then
    if not redis.call('SET', base .. ':dedup:' .. id, '1', 'NX', 'PX', dedup_ttl) then
      return {0, 'finished'}
    end
  end
  redis.call('HSET', jk, 'ts', now, 'attempts', 0, 'stalled', 0, 'pri', pri, unpack(fields))
  if delay > 0 then
    redis.call('HSET', jk, 'state', 'delayed', 'due', now + delay)
    redis.call('ZADD', base .. ':delayed', now + delay, id)
    return {1, 'delayed'}
  end
  local seq = vtime(base .. ':fair', tenant)
  redis.call('HSET', jk, 'state', 'waiting', 'seq', seq)
  redis.call('ZADD', base .. ':wait', pri * 4294967296 + seq % 4294967296, id)
  return {1, 'waiting'}
end

local function wake(base, waiting, delayed)
  local marker = base .. ':marker'
  if waiting then redis.call('LPUSH', marker, '1') end
  if delayed then redis.call('LPUSH', marker, '0') end
  if waiting or delayed then redis.call('LTRIM', marker, 0, 999) end
end
