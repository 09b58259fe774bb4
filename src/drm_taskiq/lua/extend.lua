-- Renew the leases this worker holds.
-- KEYS: 1 active zset
-- ARGV: 1 new deadline (ms), 2 job key prefix, then pairs: job id, lease token
-- Returns the ids whose lease was lost.
local lost = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HGET', ARGV[2] .. id, 'token') == ARGV[i + 1]
      and redis.call('ZSCORE', KEYS[1], id) then
    redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[1]), id)
  else
    lost[#lost + 1] = id
  end
end
return lost
