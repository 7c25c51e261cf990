-- Shared by the publish and replay scripts: the server's clock, and the expiry of
-- history past its age.
--
-- Channels whose last stored event is older than the TTL have lost their whole
-- history (the key expired). Record the newest such seq as the floor below which a
-- cursor may have missed events on a channel we no longer know.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function sweep(k_live, k_last, k_trim, k_floor, k_dead, cutoff, now)
  -- Channels whose history expired whole keep their trim mark (their last seq)
  -- for one more TTL, so one starting afresh still reports what it lost.
  local dead = redis.call('ZRANGEBYSCORE', k_dead, '-inf', cutoff, 'LIMIT', 0, 256)
  if #dead > 0 then
    redis.call('ZREM', k_dead, unpack(dead))
    redis.call('HDEL', k_trim, unpack(dead))
  end
  local old = redis.call('ZRANGEBYSCORE', k_live, '-inf', cutoff, 'LIMIT', 0, 256)
  if #old == 0 then return end
  local floor = tonumber(redis.call('GET', k_floor) or '0')
  for _, c in ipairs(old) do
    local last = redis.call('HGET', k_last, c) or '0'
    if tonumber(last) > floor then floor = tonumber(last) end
    redis.call('HSET', k_trim, c, last)
    redis.call('ZADD', k_dead, now, c)
  end
  redis.call('SET', k_floor, string.format('%d', floor))
  redis.call('ZREM', k_live, unpack(old))
  redis.call('HDEL', k_last, unpack(old))
end
local function expire_entries(k_hist, k_trim, channel, cutoff)
  while true do
    local first = redis.call('ZRANGE', k_hist, 0, 0, 'WITHSCORES')
    if #first == 0 then return end
    local ts = tonumber(string.match(first[1], '^%d+:(%d+):'))
    if ts > cutoff then return end
    redis.call('ZREMRANGEBYRANK', k_hist, 0, 0)
    redis.call('HSET', k_trim, channel, first[2])
  end
end
