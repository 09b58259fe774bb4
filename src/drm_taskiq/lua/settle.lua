-- After the ledger writer committed entries to PostgreSQL: acknowledge them and let finished
-- jobs leave Redis (now, or after the retention period).
-- KEYS: 1 ledger stream
-- ARGV: 1 consumer group, 2 job key prefix, 3 retention (ms, 0 = delete now),
--       4 JSON array of triples, flat: stream entry id, job id, finished time of that entry
--       (ms, '' when not final)
local items = cjson.decode(ARGV[4])
for i = 1, #items, 3 do
  redis.call('XACK', KEYS[1], ARGV[1], items[i])
  redis.call('XDEL', KEYS[1], items[i])
  if items[i + 2] ~= '' then
    local jk = ARGV[2] .. items[i + 1]
    local f = redis.call('HMGET', jk, 'state', 'finished')
    if (f[1] == 'completed' or f[1] == 'failed') and f[2] == items[i + 2] then
      if tonumber(ARGV[3]) > 0 then
        redis.call('PEXPIRE', jk, tonumber(ARGV[3]))
      else
        redis.call('DEL', jk)
      end
    end
  end
end
return 1
