-- Add a job. Atomic: the job hash, its place in wait or delayed, and the wake-up marker.
-- KEYS: 1 job hash (the queue's other keys share its hash tag and are named from ARGV[1]:
--       fewer arguments to send, and this script runs once per job)
-- ARGV: 1 key base ("{prefix:queue}"), 2 job id, 3 now (ms), 4 delay (ms), 5 priority,
--       6 dedup ttl (ms, 0 = none), 7 the tenant's enqueue limit per second (0 = none),
--       8.. field/value pairs for the hash
-- (add_job() and wake() come from add_job.lua.)
-- Returns what add_job() returns. (now and priority go to add_job() as the strings sent.)
local r = add_job(ARGV[1], KEYS[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5],
  tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV, 8)
if r[1] == 1 then wake(ARGV[1], r[2] == 'waiting', r[2] == 'delayed') end
return r
