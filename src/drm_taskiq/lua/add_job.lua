-- add_job(): shared by enqueue.lua and enqueue_many.lua (redis_queue.py prepends it).
-- base: the queue's key base ("{prefix:queue}"); the other keys share its hash tag:
--   base:wait, base:delayed, base:fair, base:dedup:<id>, base:rate:<tenant>:<second>,
--   base:active, base:running, base:limits, base:idle, base:to:<worker> (hand-off, below)
-- fields: an array holding the hash's field/value pairs from index `first` on (enqueue.lua
--   passes ARGV itself, so nothing is copied)
-- Returns {1, "waiting"|"delayed"} for a new job, {1, "active"} for a new job handed straight
-- to an idle worker (below), {0, state} when the id exists (nothing is changed; {0,
-- "finished"} when only its dedup key is left), {-1, count} when the tenant is over its rate
-- limit (nothing is written but the counter). The caller pushes the wake-up marker.
-- now and pri may be the decimal strings the caller was given: they are written as they are
-- (a number passed to redis.call is formatted with "%.17g" first, a cost on every job) and
-- Lua turns them into numbers where it computes with them.
-- It runs once per job: one HSET writes the job hash.

-- Direct hand-off. A worker whose take found nothing to lease registers in base:idle (member
-- "<lease ms> <take token>", score: until when the registration holds, the end of its wait
-- plus a margin) and waits (BLPOP) on its own list base:to:<worker id> as well as on the
-- wake-up marker. A new job that may run now (nothing waiting before it, no running limits
-- per tenant configured) is leased here to the most recently registered worker, as take.lua
-- would lease it, and its delivery pushed onto that worker's list: the worker's BLPOP returns
-- the job itself, with no take.lua on the way. The registration is used up (one job each);
-- the worker registers again with its next take. A worker that dies with a delivery in its
-- list loses nothing: the job is leased, and the stalled check gives it back when the lease
-- runs out; the list expires with the lease. Registrations past their score are skipped
-- (newest first, so a dead worker's registration is picked only when no live worker has
-- registered since).
local function idle_worker(base, now, score)
  local found = redis.call('ZREVRANGEBYSCORE', base .. ':idle', '+inf', now, 'LIMIT', 0, 1)
  if #found == 0 then return nil end
  if redis.call('HLEN', base .. ':limits') > 0 then return nil end
  -- a job ahead of this one (a retried or promoted job, or one of a higher priority) waits:
  -- the worker takes that one first, through the marker
  local head = redis.call('ZRANGE', base .. ':wait', 0, 0, 'WITHSCORES')
  if head[2] and tonumber(head[2]) <= score then return nil end
  return found[1]
end

-- The delivery: its fields joined by newlines, the message last (job ids and tokens hold no
-- newline; redis_queue.py's Delivery.unpack reads it).
local function hand_off(base, member, id, now, seq, tenant, f)
  local lease, token = string.match(member, '^(%d+) (.+)$')
  local worker = string.match(token, '^(.*):')
  redis.call('ZREM', base .. ':idle', member)
  redis.call('ZADD', base .. ':active', now + tonumber(lease), id)
  redis.call('HINCRBY', base .. ':running', tenant, 1)
  redis.call('HSET', base .. ':fair', '~floor', seq)
  local list = base .. ':to:' .. worker
  redis.call('RPUSH', list, id .. '\n' .. f.attempts .. '\n' .. f.stalled .. '\n' .. f.ts ..
    '\n' .. token .. '\n' .. f.msg)
  redis.call('PEXPIRE', list, lease)
end

local function add_job(base, jk, id, now, delay, pri, dedup_ttl, limit, fields, first)
  local state = redis.call('HGET', jk, 'state')
  if state then return {0, state} end
  local tenant, clash = '', false
  -- the delivery's fields, should the job be handed off (the given fields win, as below)
  local f = {msg = '', attempts = '0', stalled = '0', ts = now}
  for i = first, #fields, 2 do
    local name = fields[i]
    if name == 'tenant' then
      tenant = fields[i + 1]
    elseif name == 'state' or name == 'due' or name == 'seq' or name == 'token'
        or name == 'processed' then
      clash = true
    elseif f[name] then
      f[name] = fields[i + 1]
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
  local score = pri * 4294967296 + seq % 4294967296
  local member = idle_worker(base, now, score)
  if member then
    local token = string.match(member, ' (.+)$')
    redis.call('HSET', jk, 'ts', now, 'attempts', '0', 'stalled', '0', 'pri', pri,
      'state', 'active', 'seq', seq, 'token', token, 'processed', now, unpack(fields, first))
    if clash then
      redis.call('HSET', jk, 'state', 'active', 'seq', seq, 'token', token, 'processed', now)
    end
    hand_off(base, member, id, now, seq, tenant, f)
    return {1, 'active'}
  end
  redis.call('HSET', jk, 'ts', now, 'attempts', '0', 'stalled', '0', 'pri', pri,
    'state', 'waiting', 'seq', seq, unpack(fields, first))
  if clash then redis.call('HSET', jk, 'state', 'waiting', 'seq', seq) end
  redis.call('ZADD', base .. ':wait', score, id)
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
