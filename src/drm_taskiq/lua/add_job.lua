-- add_job(): shared by enqueue.lua and enqueue_many.lua (redis_queue.py prepends it).
-- base: the queue's key base ("{prefix:queue}"); the other keys share its hash tag:
--   base:wait, base:delayed, base:fair, base:dedup:<id>, base:rate:<tenant>:<second>
-- fields: an array holding the hash's field/value pairs from index `first` on (enqueue.lua
--   passes ARGV itself, so nothing is copied)
-- Returns {1, "waiting"|"delayed"} for a new job, {0, state} when the id exists (nothing is
-- changed; {0, "finished"} when only its dedup key is left), {-1, count} when the tenant is
-- over its rate limit (nothing is written but the counter). The caller pushes the wake-up marker.
-- now and pri may be the decimal strings the caller was given: they are written as they are
-- (a number passed to redis.call is formatted with "%.17g" first, a cost on every job) and
-- Lua turns them into numbers where it computes with them.
-- It runs once per job: one HSET writes the job hash.
local function add_job(base, jk, id, now, delay, pri, dedup_ttl, limit, fields, first)
  local state = redis.call('HGET', jk, 'state')
  if state then return {0, state} end
  local tenant, clash = '', false
  for i = first, #fields, 2 do
    local name = fields[i]
    if name == 'tenant' then
      tenant = fields[i + 1]
    elseif name == 'state' or name == 'due' or name == 'seq' then
      clash = true
    end
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
  -- The given fields go last (unpack() expands only there): they win over ts, attempts,
  -- stalled and pri. state and due/seq win over them: written again if the fields name one.
  if delay > 0 then
    local due = now + delay
    redis.call('HSET', jk, 'ts', now, 'attempts', '0', 'stalled', '0', 'pri', pri,
      'state', 'delayed', 'due', due, unpack(fields, first))
    if clash then redis.call('HSET', jk, 'state', 'delayed', 'due', due) end
    redis.call('ZADD', base .. ':delayed', due, id)
    return {1, 'delayed'}
  end
  local seq = vtime(base .. ':fair', tenant)
  redis.call('HSET', jk, 'ts', now, 'attempts', '0', 'stalled', '0', 'pri', pri,
    'state', 'waiting', 'seq', seq, unpack(fields, first))
  if clash then redis.call('HSET', jk, 'state', 'waiting', 'seq', seq) end
  redis.call('ZADD', base .. ':wait', pri * 4294967296 + seq % 4294967296, id)
  return {1, 'waiting'}
end

-- The wake-up marker: '1' for new waiting jobs, '0' for new delayed ones; the list keeps its
-- newest 1,000 entries (LTRIM only when a push made it longer than that).
local function wake(base, waiting, delayed)
  local marker = base .. ':marker'
  local length = 0
  if waiting then length = redis.call('LPUSH', marker, '1') end
  if delayed then length = redis.call('LPUSH', marker, '0') end
  if length > 1000 then redis.call('LTRIM', marker, '0', '999') end
end
