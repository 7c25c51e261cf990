-- Claim a run's end: the one call that gets 1 publishes its terminal event.
-- KEYS[1] the run's hash. ARGV[1] the retention in ms (the id stays taken so long).
-- An unknown run (its producer's store lost it) is ended too.
local k_run = KEYS[1]
local retain_ms = tonumber(ARGV[1])
if redis.call('HGET', k_run, 'ended') == '1' then return 0 end
redis.call('HSET', k_run, 'ended', 1, 'lease', 0)
if redis.call('HEXISTS', k_run, 'cancelled') == 0 then
  redis.call('HSET', k_run, 'owner', '', 'cancelled', 0, 'first', 0)
end
redis.call('PEXPIRE', k_run, retain_ms)
return 1
