-- After a chunk fired: raise the last fired slot of its schedules (never backwards) and record
-- the job of the last slot fired (cron:{schedule id}:{slot ms}).
-- KEYS: 1 the cron:last hash, 2 the cron:lastjob hash
-- ARGV: groups of: slot to raise cron:last to (ms, '' = leave it), slot of the last job fired
--       (ms, '' = none), count n, then n schedule ids
local i = 1
while i <= #ARGV do
  local advance, fired, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  for j = i + 3, i + 2 + n do
    local id = ARGV[j]
    if advance ~= '' then
      local last = redis.call('HGET', KEYS[1], id)
      if (not last) or tonumber(last) < tonumber(advance) then
        redis.call('HSET', KEYS[1], id, advance)
      end
    end
    if fired ~= '' then
      redis.call('HSET', KEYS[2], id, 'cron:' .. id .. ':' .. fired)
    end
  end
  i = i + 3 + n
end
return 1
