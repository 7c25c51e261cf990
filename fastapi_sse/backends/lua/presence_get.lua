-- Who is on a channel (Coordination.presence). KEYS[1] the channel's presence hash.
-- ARGV[1] the prefix of the workers' registration keys.
-- Returns identity, streams, identity, streams, ... across live workers.
local k_presence, k_worker_prefix = KEYS[1], ARGV[1]
local live = tally(k_presence, k_worker_prefix)
local out = {}
for identity, streams in pairs(live) do
  table.insert(out, identity)
  table.insert(out, streams)
end
return out
