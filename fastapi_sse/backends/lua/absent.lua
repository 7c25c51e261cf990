-- Forget the presence of workers no longer registered (Coordination.absent).
-- KEYS[1] the set of channels with presence. ARGV[1] the prefix of the channels'
-- presence hashes, ARGV[2] the prefix of the workers' registration keys.
-- Returns channel, identity, ... for each identity that left a channel with them.
local k_channels, k_hash_prefix, k_worker_prefix = KEYS[1], ARGV[1], ARGV[2]
local out = {}
for _, channel in ipairs(redis.call('SMEMBERS', k_channels)) do
  local k_presence = k_hash_prefix .. channel
  local live, dead = tally(k_presence, k_worker_prefix)
  for identity, _ in pairs(dead) do
    if (live[identity] or 0) == 0 then
      table.insert(out, channel)
      table.insert(out, identity)
    end
  end
  if redis.call('EXISTS', k_presence) == 0 then redis.call('SREM', k_channels, channel) end
end
return out
