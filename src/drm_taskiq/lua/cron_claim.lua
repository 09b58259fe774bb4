-- Read the last fired slot of many schedules, start missing ones at "now", and claim the chunk.
-- KEYS: 1 the cron:last hash, 2 the chunk's claim key
-- ARGV: 1 now (ms, the value for schedules seen for the first time), 2 this scheduler's id,
--       3 claim ttl (ms; 0 = do not claim), 4 '1' = return no values when another scheduler
--       holds the chunk, 5.. schedule ids
-- Returns {claimed, last 1, last 2, ...}: claimed is 1 when the chunk is (or already was) this
-- scheduler's, 0 when another scheduler holds it (then {0} alone if ARGV[4] is '1').
local claimed = 1
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  local holder = redis.call('GET', KEYS[2])
  if holder and holder ~= ARGV[2] then
    if ARGV[4] == '1' then return {0} end
    claimed = 0
  else
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
  end
end
local out = {claimed}
for i = 5, #ARGV do
  local last = redis.call('HGET', KEYS[1], ARGV[i])
  if not last then
    last = ARGV[1]
    redis.call('HSET', KEYS[1], ARGV[i], last)
  end
  out[#out + 1] = last
end
return out
