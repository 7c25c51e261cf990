-- Start the counter if Redis lost it (see counter.lua) and return its value.
-- Assembled after counter.lua.
--
-- KEYS[1] the seq counter, KEYS[2] the floor.
-- No ARGV.
local k_seq, k_floor = KEYS[1], KEYS[2]

start_counter(k_seq, k_floor)
return redis.call('GET', k_seq)
