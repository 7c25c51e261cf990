-- Add a member to a group capped across workers (Coordination.claim).
--
-- KEYS[1] the group: a sorted set of members scored by the time they joined (ms).
-- ARGV[1] the member, ARGV[2] the limit, ARGV[3] '1' to evict the oldest members
-- when the group is full (else refuse), ARGV[4] the prefix of the workers'
-- registration keys (a worker's is the prefix and its id).
--
-- Members are client ids, "<worker id>.<rest>" (see fastapi_sse/_names.py): the
-- part before the first dot names the worker holding the client. Members of
-- workers whose registration expired are dropped before counting.
-- Returns the evicted members, or false when refused.
local k_group = KEYS[1]
local member, limit, evict, k_worker_prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, m in ipairs(redis.call('ZRANGE', k_group, 0, -1)) do
  local owner = string.match(m, '^([^.]+)%.')
  if owner == nil or redis.call('EXISTS', k_worker_prefix .. owner) == 0 then
    redis.call('ZREM', k_group, m)
  end
end
local evicted = {}
local over = redis.call('ZCARD', k_group) - limit + 1
if over > 0 then
  if evict ~= '1' then return false end
  local popped = redis.call('ZPOPMIN', k_group, over)
  for i = 1, #popped, 2 do table.insert(evicted, popped[i]) end
end
redis.call('ZADD', k_group, now, member)
return evicted
