-- Shared by the publish script.
--
-- The id index is a hash of fields "<channel>\n<id>" (ids hold no LF) whose value is
-- the seq, or 'r' once the id was published twice on that channel; the id times
-- sorted set scores each field by its last use, to expire it and cap the index.
-- ``count`` is the size of the id times set (read once per batch, kept up to date).
local function expire_ids(k_ids, k_times, cutoff)
  local old = redis.call('ZRANGEBYSCORE', k_times, '-inf', cutoff, 'LIMIT', 0, 256)
  if #old > 0 then
    redis.call('ZREM', k_times, unpack(old))
    redis.call('HDEL', k_ids, unpack(old))
  end
end
local function index_id(k_ids, k_times, id, sseq, now, channels, cap, count)
  for _, channel in ipairs(channels) do
    local field = channel .. '\n' .. id
    if redis.call('HSETNX', k_ids, field, sseq) == 0 then redis.call('HSET', k_ids, field, 'r') end
    count = count + redis.call('ZADD', k_times, now, field)
  end
  local extra = count - cap
  if extra > 0 then
    local gone = redis.call('ZPOPMIN', k_times, extra)
    for i = 1, #gone, 2 do redis.call('HDEL', k_ids, gone[i]) end
    count = count - #gone / 2
  end
  return count
end
