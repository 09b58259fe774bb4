-- Shared by enqueue.lua, take.lua and retry.lua (redis_queue.py prepends it to them).
local function vtime(key, tenant)
  -- Start-time fair queuing: a tenant's next job gets max(its last, the global floor) + 1, so
  -- tenants that share a priority take turns, while each tenant stays FIFO.
  local last = tonumber(redis.call('HGET', key, tenant) or '0')
  local floor = tonumber(redis.call('HGET', key, '~floor') or '0')
  local v = math.max(last, floor) + 1
  redis.call('HSET', key, tenant, v)
  return v
end
