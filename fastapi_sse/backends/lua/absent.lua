-- Forget the presence of workers no longer registered (Coordination.absent).
-- KEYS[1] the set of workers with presence. ARGV[1] the prefix of the channels'
-- presence hashes, ARGV[2] the prefix of the workers' registration keys, ARGV[3]
-- the prefix of a worker's set of the channels it holds presence on.
-- Returns channel, identity, ... for each identity that left a channel with them.
-- While every worker lives it reads one key per worker, whatever the channels.
local k_workers, k_hash_prefix, k_worker_prefix, k_held_prefix = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local out = {}
for _, worker in ipairs(redis.call('SMEMBERS', k_workers)) do
  if redis.call('EXISTS', k_worker_prefix .. worker) == 0 then
    local k_held = k_held_prefix .. worker
    for _, channel in ipairs(redis.call('SMEMBERS', k_held)) do
      local live, dead = tally(k_hash_prefix .. channel, k_worker_prefix)
      for identity, _ in pairs(dead) do
        if (live[identity] or 0) == 0 then
          table.insert(out, channel)
          table.insert(out, identity)
        end
      end
    end
    redis.call('DEL', k_held)
    redis.call('SREM', k_workers, worker)
  end
end
return out
