-- Add many jobs in one call, each as enqueue.lua would (each job on its own: one refused does
-- not stop the others); one wake-up marker for all of them.
-- KEYS: the job hashes, in the order of ARGV[3]
-- ARGV: 1 key base ("{prefix:queue}"), 2 now (ms), 3 a JSON array with, per job:
--       [id, delay (ms), priority, dedup ttl (ms), rate limit per second, [field, value, ...]]
-- (add_job() and wake() come from add_job.lua.)
-- Returns a flat array: code, state for each job (see add_job()).
local base = ARGV[1]
local now = ARGV[2]  -- the string (see add_job.lua)
local out = {}
local waiting, delayed = false, false
for i, job in ipairs(cjson.decode(ARGV[3])) do
  local r = add_job(base, KEYS[i], job[1], now, tonumber(job[2]), tonumber(job[3]),
    tonumber(job[4]), tonumber(job[5]), job[6], 1)
  if r[1] == 1 then
    if r[2] == 'waiting' then waiting = true else delayed = true end
  end
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
end
wake(base, waiting, delayed)
return out
