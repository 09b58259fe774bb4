-- Retry a failed job by id: a new generation of attempts, back in waiting.
-- KEYS: 1 job hash, 2 wait, 3 fair-queuing times (hash), 4 marker
-- ARGV: 1 job id, 2 message (used when the hash is gone), 3 now (ms), 4.. field/value pairs
--       for a new hash
-- (vtime() comes from fair.lua.)
-- Returns 1 when the job is waiting again, 0 when it exists and is not failed.
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= 'failed' then return 0 end
if state then
  redis.call('HINCRBY', KEYS[1], 'gen', 1)
  redis.call('HDEL', KEYS[1], 'reason', 'finished', 'rv', 'token', 'due', 'progress')
  redis.call('PERSIST', KEYS[1])
else
  local fields = {}
  for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], 'msg', ARGV[2], unpack(fields))
end
local seq = vtime(KEYS[3], redis.call('HGET', KEYS[1], 'tenant') or '')
redis.call('HSET', KEYS[1], 'state', 'waiting', 'attempts', 0, 'stalled', 0, 'seq', seq,
  'ready', ARGV[3])
local pri = tonumber(redis.call('HGET', KEYS[1], 'pri') or '0')
redis.call('ZADD', KEYS[2], pri * 4294967296 + seq % 4294967296, ARGV[1])
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, 999)
return 1
