-- Purge dead-lettered jobs, up to ARGV[2] list entries per call (the caller repeats until the
-- list is empty, so that Redis is never held for long).
-- KEYS: 1 dead list
-- ARGV: 1 job key prefix, 2 entries per call
-- Each id taken from the head of the list: its job hash is deleted when the job is still
-- failed (a dead-lettered job retried since, waiting, running or finished again, is left
-- alone); the id leaves the list either way.
-- Returns {entries taken, job hashes deleted, entries left}.
local ids = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local deleted = 0
for _, id in ipairs(ids) do
  local jk = ARGV[1] .. id
  if redis.call('HGET', jk, 'state') == 'failed' then
    redis.call('DEL', jk)
    deleted = deleted + 1
  end
end
redis.call('LTRIM', KEYS[1], #ids, -1)
return {#ids, deleted, redis.call('LLEN', KEYS[1])}
