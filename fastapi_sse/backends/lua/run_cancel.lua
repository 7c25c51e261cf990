-- Ask a run to stop. KEYS[1] the run's hash.
-- Returns 1, or 0 when the run is unknown or has ended.
local k_run = KEYS[1]
local ended = redis.call('HGET', k_run, 'ended')
if ended ~= '0' then return 0 end
redis.call('HSET', k_run, 'cancelled', 1)
return 1
