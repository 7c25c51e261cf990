-- Extend the lease of an owner's run; its state. Assembled after sweep.lua (now_ms).
-- KEYS[1] the run's hash. ARGV[1] the owner, ARGV[2] the lease in ms, ARGV[3] the
-- retention in ms. Returns {live, ended, cancelled (0 or 1 each), first}, or false when the
-- run is unknown.
local k_run = KEYS[1]
local owner, lease_ms, retain_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local run = redis.call('HMGET', k_run, 'owner', 'lease', 'ended', 'cancelled', 'first')
if not run[1] then return false end
local now = now_ms()
local live = 0
if run[1] == owner and run[3] == '0' then
  redis.call('HSET', k_run, 'lease', now + lease_ms)
  redis.call('PEXPIRE', k_run, lease_ms + retain_ms)
  live = 1
elseif run[3] == '0' and tonumber(run[2]) > now then
  live = 1
end
return {live, tonumber(run[3]), tonumber(run[4]), tonumber(run[5] or '0')}
