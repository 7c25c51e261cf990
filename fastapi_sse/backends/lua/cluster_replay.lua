-- What one channel's history holds after a cursor, on a Redis Cluster.
--
-- KEYS[1] the channel's history (the base of its tag, ":h:" and the channel).
-- ARGV[1] the cursor (after), ARGV[2] the tag's key base, ARGV[3] the channel,
-- ARGV[4] the history TTL in ms, ARGV[5] the margin in microseconds (see
-- cluster_publish.lua).
--
-- Returns the head (the newest seq of the tag, or the server's time when that is
-- later: any event stored from now on comes after it), the floor (the history is
-- complete after it) and the entries after the cursor.
local hist = KEYS[1]
local after_text, base, channel = ARGV[1], ARGV[2], ARGV[3]
local ttl, margin = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local head = tonumber(redis.call('GET', base .. ':s') or '0')
if now_us > head then head = now_us end
local floor = redis.call('HGET', base .. ':m', channel)
if floor == false then
  -- Nothing held: what the channel had (if anything) expired whole, so it is
  -- complete after the oldest time an event could still be held from.
  floor = string.format('%d', now_us - ttl * 1000 + margin)
end
local found = {}
if tonumber(floor) <= tonumber(after_text) then
  found = redis.call('ZRANGEBYSCORE', hist, '(' .. after_text, '+inf')
end
return {string.format('%d', head), floor, found}
