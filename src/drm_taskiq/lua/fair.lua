-- Shared by enqueue.lua, enqueue_many.lua (through add_job.lua), take.lua and retry.lua
-- (redis_queue.py prepends it to them).
local function vtime(key, tenant)
  -- Start-time fair queuing: a tenant's next job gets max(its last, the global floor) + 1, so
  -- tenants that share a priority take turns, while each tenant stays FIFO. One HMGET for
  -- both (each redis.call costs Redis a few microseconds when it runs once per job).
  local clock = redis.call('HMGET', key, tenant, '~floor')
  local v = math.max(tonumber(clock[1] or '0'), tonumber(clock[2] or '0')) + 1
  redis.call('HSET', key, tenant, v)
  return v
end
