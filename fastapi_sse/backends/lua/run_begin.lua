-- Take a run's id for a new run. Assembled after sweep.lua (now_ms).
-- KEYS[1] the run's hash (owner, lease: ms the lease ends, ended, cancelled).
-- ARGV[1] the owner (a worker id), ARGV[2] the lease in ms, ARGV[3] the retention in ms,
-- ARGV[4] the sequence number the run's events come after.
-- Returns 1, or 0 when the id is in use or still retained.
local k_run = KEYS[1]
local owner, lease_ms, retain_ms, first = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if redis.call('EXISTS', k_run) == 1 then return 0 end
redis.call('HSET', k_run, 'owner', owner, 'lease', now_ms() + lease_ms, 'ended', 0, 'cancelled', 0, 'first', first)
redis.call('PEXPIRE', k_run, lease_ms + retain_ms)
return 1
