-- Raise the last fired slot of many schedules; never moves one backwards.
-- KEYS: 1 the cron:last hash
-- ARGV: schedule id, slot (ms), schedule id, slot (ms), ...
for i = 1, #ARGV, 2 do
  local last = redis.call('HGET', KEYS[1], ARGV[i])
  if (not last) or tonumber(last) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
