-- Store and announce a batch of events whose channels share one hash tag, in
-- order, atomically, on a Redis Cluster (every key and the shard channel of the
-- batch are in the tag's slot).
--
-- Each tag has its own sequence: an event's seq is the server's time in
-- microseconds, or one more than the tag's last seq when that is ahead, so seqs
-- increase on every channel and keep increasing past a failover or a history that
-- expired whole. History entries are members "seq:ms:<id length>:<id><payload>"
-- scored by seq, as on one Redis. The token key holds the batch's seqs while a
-- re-send of it can arrive: the batch is then not stored again.
--
-- KEYS[1] this batch's token, then the token keys to delete (ARGV[6] of them).
-- ARGV[1] history size, ARGV[2] history TTL in ms, ARGV[3] token TTL in ms,
-- ARGV[4] the number of events, ARGV[5] the events, ARGV[6] the number of token keys
-- to delete, ARGV[7] the tag's key base (its keys are this and a suffix: ":s" the
-- last seq, ":b" the backlog of a worker's clients; a channel's history is the base,
-- ":h:" and the channel, its trim mark the field of the channel in ":m"),
-- ARGV[8] the margin in microseconds a fresh channel's history starts before
-- now minus the TTL.
-- The events: for each, a header (struct '>BHHIHI': store, the lengths of channel,
-- id, payload and shard channel, the events its channel's history keeps, 0 for the
-- history size), then those four strings.
--
-- Returns the seqs of the batch, joined by ','.
local k_token = KEYS[1]
local size, ttl, token_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local n, blob, forget, base = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), ARGV[7]
local margin = tonumber(ARGV[8])

if forget > 0 then redis.call('DEL', unpack(KEYS, 2, 1 + forget)) end
local done = redis.call('GET', k_token)
if done then return done end

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = string.format('%d', math.floor(now_us / 1000))
local k_seq, k_marks, k_backlog = base .. ':s', base .. ':m', base .. ':b'
local last = tonumber(redis.call('GET', k_seq) or '0')
local fresh_floor = string.format('%d', now_us - ttl * 1000 + margin)
local histories, order, backlog, seqs = {}, {}, {}, {}
local pos = 1
local sub, unpack_header = string.sub, struct.unpack
for i = 1, n do
  local store, cl, il, pl, rl, keep
  store, cl, il, pl, rl, keep, pos = unpack_header('>BHHIHI', blob, pos)
  if keep == 0 then keep = size end
  local channel = sub(blob, pos, pos + cl - 1)
  local id = sub(blob, pos + cl, pos + cl + il - 1)
  pos = pos + cl + il
  local payload = sub(blob, pos, pos + pl - 1)
  local route = sub(blob, pos + pl, pos + pl + rl - 1)
  pos = pos + pl + rl
  local seq = now_us
  if seq <= last then seq = last + 1 end
  last = seq
  local sseq = string.format('%d', seq)
  seqs[i] = sseq
  if store == 1 and keep > 0 then
    local h = histories[channel]
    if h == nil then
      h = {members = {}, keep = keep}
      histories[channel] = h
      table.insert(order, channel)
    end
    local eid = id
    if eid == '' then eid = sseq end
    table.insert(h.members, seq)
    table.insert(h.members, sseq .. ':' .. now_ms .. ':' .. #eid .. ':' .. eid .. payload)
    h.keep = keep
  end
  local message = sseq .. '\n' .. #id .. '\n' .. #channel .. '\n' .. id .. channel .. payload
  if store == 0 then table.insert(backlog, message) end
  redis.call('SPUBLISH', route, message)
end
redis.call('SET', k_seq, string.format('%d', last), 'PX', ttl)
for _, channel in ipairs(order) do
  local h, hist = histories[channel], base .. ':h:' .. channel
  if redis.call('EXISTS', hist) == 0 and redis.call('HEXISTS', k_marks, channel) == 0 then
    -- A channel without history: what it held before (if anything) expired whole.
    redis.call('HSET', k_marks, channel, fresh_floor)
  end
  redis.call('ZADD', hist, unpack(h.members))
  local count = redis.call('ZCARD', hist)
  if count > h.keep then
    local cut = redis.call('ZRANGE', hist, count - h.keep - 1, count - h.keep - 1, 'WITHSCORES')
    redis.call('ZREMRANGEBYRANK', hist, 0, count - h.keep - 1)
    local mark = tonumber(redis.call('HGET', k_marks, channel) or '0')
    if tonumber(cut[2]) > mark then redis.call('HSET', k_marks, channel, cut[2]) end
  end
  redis.call('PEXPIRE', hist, ttl)
end
if #order > 0 then redis.call('PEXPIRE', k_marks, ttl) end
if #backlog > 0 then
  -- Events for one client are kept out of history but in a short backlog of their
  -- worker, so that a worker cut off from its shard can catch up on them too.
  local cap = size
  if cap < 1 then cap = 1 end
  redis.call('LPUSH', k_backlog, unpack(backlog))
  redis.call('LTRIM', k_backlog, 0, cap - 1)
  redis.call('PEXPIRE', k_backlog, ttl)
end
local joined = table.concat(seqs, ',')
redis.call('SET', k_token, joined, 'PX', token_ttl)
return joined
