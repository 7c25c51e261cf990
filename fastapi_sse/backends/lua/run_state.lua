-- A run's state. Assembled after sweep.lua (now_ms).
-- KEYS[1] the run's hash. Returns {live, ended, cancelled (0 or 1 each), first}, or false
-- when the run is unknown.
local k_run = KEYS[1]
local run = redis.call('HMGET', k_run, 'owner', 'lease', 'ended', 'cancelled', 'first')
if not run[1] then return false end
local live = 0
if run[3] == '0' and tonumber(run[2]) > now_ms() then live = 1 end
return {live, tonumber(run[3]), tonumber(run[4]), tonumber(run[5] or '0')}
