-- After the ledger writer committed entries to PostgreSQL: acknowledge them and let finished
-- jobs leave Redis (now, or after the retention period).
-- KEYS: 1 ledger stream
-- ARGV: 1 consumer group, 2 job key prefix, 3 retention (ms, 0 = delete now),
--       4 JSON array of triples, flat: stream entry id, job id, finished time of that entry
--       (ms, '' when not final)
-- Redis runs nothing else while a script runs, and sends no reply (a worker's take, a
-- producer's enqueue) until it is done: the writer sends a batch in parts (RedisQueue
-- .settle_ledger), and XACK and XDEL take every id of a part at once.
-- (unpack() puts the ids on Lua's stack: a part is far below its limit of 8,000.)
local items = cjson.decode(ARGV[4])
local ids = {}
for i = 1, #items, 3 do ids[#ids + 1] = items[i] end
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
local retention = tonumber(ARGV[3])
for i = 1, #items, 3 do
  if items[i + 2] ~= '' then
    local jk = ARGV[2] .. items[i + 1]
    local f = redis.call('HMGET', jk, 'state', 'finished')
    if (f[1] == 'completed' or f[1] == 'failed') and f[2] == items[i + 2] then
      if retention > 0 then
        redis.call('PEXPIRE', jk, retention)
      else
        redis.call('DEL', jk)
      end
    end
  end
end
return 1
