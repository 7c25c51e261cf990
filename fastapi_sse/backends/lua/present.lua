-- Set a worker's streams of an identity on a channel (Coordination.present).
-- KEYS[1] the channel's presence hash, KEYS[2] the set of workers with presence,
-- KEYS[3] the set of channels this worker holds presence on.
-- ARGV[1] the channel, ARGV[2] the worker id, ARGV[3] the identity, ARGV[4] its
-- streams at that worker, ARGV[5] the prefix of the workers' registration keys.
-- Returns {streams before, streams after} across live workers.
local k_presence, k_workers, k_held = KEYS[1], KEYS[2], KEYS[3]
local channel, worker, identity = ARGV[1], ARGV[2], ARGV[3]
local streams, k_worker_prefix = tonumber(ARGV[4]), ARGV[5]
local live = tally(k_presence, k_worker_prefix)
local before = live[identity] or 0
local field = worker .. '\n' .. identity
local mine = tonumber(redis.call('HGET', k_presence, field) or '0')
if streams > 0 then
  redis.call('HSET', k_presence, field, streams)
  -- Indexed by worker: only a dead worker's channels are read to find who left.
  redis.call('SADD', k_held, channel)
  redis.call('SADD', k_workers, worker)
else
  redis.call('HDEL', k_presence, field)
end
return {before, before - mine + streams}
