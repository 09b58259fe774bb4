-- Promote due delayed jobs, then lease up to N waiting jobs, lowest (priority, fair time) first,
-- skipping tenants that already run as many jobs as their limit allows.
-- KEYS: 1 wait zset, 2 delayed zset, 3 active zset, 4 fair-queuing times (hash), 5 marker list,
--       6 jobs running per tenant (hash), 7 per-tenant running limits (hash)
-- ARGV: 1 now (ms), 2 lease (ms), 3 lease token, 4 max jobs, 5 job key prefix,
--       6 default running limit per tenant (0 = none)
-- (vtime() comes from fair.lua.)
-- Returns {{id, msg, attempts, stalled, created ts, ...}, next delayed due time (ms) or false}
-- The sorted-set and per-tenant counter updates are batched: one ZADD/ZREM per key and one
-- HINCRBY per tenant, after the per-job loop (the script reads none of them in between: the
-- running counts of limited tenants are read once and kept up to date here).
local now = tonumber(ARGV[1])
local prefix = ARGV[5]

-- One command per up to 1000 items (Lua's unpack() has a stack limit).
local function batched(cmd, key, items)
  for i = 1, #items, 1000 do
    redis.call(cmd, key, unpack(items, i, math.min(i + 999, #items)))
  end
end

local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
if #due > 0 then
  local promoted = {}
  for _, id in ipairs(due) do
    local jk = prefix .. id
    local f = redis.call('HMGET', jk, 'pri', 'tenant')
    local pri = tonumber(f[1])
    if pri then
      local seq = vtime(KEYS[4], f[2] or '')
      promoted[#promoted + 1] = pri * 4294967296 + seq % 4294967296
      promoted[#promoted + 1] = id
      redis.call('HSET', jk, 'state', 'waiting', 'seq', seq, 'ready', ARGV[1])
      redis.call('HDEL', jk, 'due')
    end
  end
  batched('ZADD', KEYS[1], promoted)
  batched('ZREM', KEYS[2], due)
end

local out = {}
local max = tonumber(ARGV[4])
local default_limit = tonumber(ARGV[6])
local limited = default_limit > 0 or redis.call('HLEN', KEYS[7]) > 0
local candidates
if limited then
  candidates = redis.call('ZRANGE', KEYS[1], 0, max * 8 + 32)
else
  candidates = {}
  local popped = redis.call('ZPOPMIN', KEYS[1], max)
  for i = 1, #popped, 2 do candidates[#candidates + 1] = popped[i] end
end
local deadline = now + tonumber(ARGV[2])
local top = 0  -- the highest fair-queuing time leased
local taken = 0
local removed = {}   -- ids to remove from waiting (limited: the ones not skipped)
local leased = {}    -- deadline, id pairs for the active set
local tenants = {}   -- tenants with leased jobs, in first-lease order
local added = {}     -- tenant -> jobs leased to it in this call
local limits = {}    -- tenant -> running limit (limited)
local running = {}   -- tenant -> jobs running, this call's leases included (limited)
for _, id in ipairs(candidates) do
  if taken >= max then break end
  local jk = prefix .. id
  local f = redis.call('HMGET', jk, 'msg', 'attempts', 'stalled', 'ts', 'tenant', 'seq')
  local tenant = f[5] or ''
  local allowed = true
  if limited then
    local limit = limits[tenant]
    if limit == nil then
      limit = tonumber(redis.call('HGET', KEYS[7], tenant) or default_limit)
      limits[tenant] = limit
    end
    if limit > 0 then
      if running[tenant] == nil then
        running[tenant] = tonumber(redis.call('HGET', KEYS[6], tenant) or '0')
      end
      if running[tenant] >= limit then allowed = false end
    end
    if allowed then removed[#removed + 1] = id end
  end
  if allowed then
    if f[1] then
      leased[#leased + 1] = deadline
      leased[#leased + 1] = id
      redis.call('HSET', jk, 'state', 'active', 'token', ARGV[3], 'processed', ARGV[1])
      if added[tenant] == nil then
        tenants[#tenants + 1] = tenant
        added[tenant] = 1
      else
        added[tenant] = added[tenant] + 1
      end
      if running[tenant] ~= nil then running[tenant] = running[tenant] + 1 end
      top = math.max(top, tonumber(f[6] or '0'))
      out[#out + 1] = id
      out[#out + 1] = f[1]
      out[#out + 1] = f[2]
      out[#out + 1] = f[3]
      out[#out + 1] = f[4]
      taken = taken + 1
    end
  end
end
batched('ZREM', KEYS[1], removed)
batched('ZADD', KEYS[3], leased)
for _, tenant in ipairs(tenants) do
  redis.call('HINCRBY', KEYS[6], tenant, added[tenant])
end
if taken > 0 and top > tonumber(redis.call('HGET', KEYS[4], '~floor') or '0') then
  redis.call('HSET', KEYS[4], '~floor', top)
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
-- Every waiting job was looked at (fewer candidates than asked for, or the whole waiting set
-- fitted in the window) and fewer than asked for were leased: nothing more can be taken now
-- (an empty queue, or every waiting tenant at its limit), so stale wake-up markers would only
-- cause empty takes. A job enqueued, or a running job settled, after this script pushes a
-- fresh marker, and the caller waits at most until the next delayed job is due, so no wake-up
-- is lost. This lets a worker whose take came back short wait for the marker at once.
local examined_all = #due < 1000 and (
  (limited and #candidates < max * 8 + 33) or (not limited and #candidates < max))
if #out == 0 or (taken < max and examined_all) then
  redis.call('DEL', KEYS[5])
end
return {out, nxt[2] or false}
