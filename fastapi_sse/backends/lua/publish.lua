-- Store and announce a batch of events, in order, atomically. Assembled after
-- sweep.lua, counter.lua and id_index.lua.
--
-- One INCRBY numbers them (seqs first..first+n-1), each is PUBLISHed in that order,
-- and the work per channel (trimming, expiry, the channel's marks) and per batch
-- (sweeps) is done once. History entries are members "seq:ms:<id length>:<id><payload>"
-- scored by seq, so one ZRANGEBYSCORE answers a replay; ms (server time) lets a
-- replay expire entries one by one. The token key holds the first seq while a re-send
-- of the same batch can arrive (redis-py's retry after a lost reply, the outbox's
-- after a failure): the batch is then not stored again. The caller deletes token
-- keys once it has the reply, in a later call (the last keys of KEYS).
--
-- KEYS[1] the seq counter, KEYS[2] last (hash: channel -> its last stored seq),
-- KEYS[3] live (sorted set: channel scored by the time of its last event),
-- KEYS[4] trim (hash: channel -> seq its history was trimmed to), KEYS[5] the floor,
-- KEYS[6] ids (the id index), KEYS[7] id times, KEYS[8] dead (sorted set of channels
-- whose history expired whole), KEYS[9] this batch's token,
-- then the worker backlog keys the events name (by their position in KEYS),
-- then the token keys to delete (the last ARGV[6] of KEYS).
-- ARGV[1] history size, ARGV[2] history TTL in ms, ARGV[3] id index size,
-- ARGV[4] token TTL in ms, ARGV[5] the number of events, ARGV[6] the number of token
-- keys to delete, ARGV[7] the events, ARGV[8] the prefix of history keys (a
-- channel's is the prefix and its name).
-- The events: for each, a header (struct '>BHHHIHHI': store, the position in KEYS of
-- its worker backlog (one client's events) or 0, then the lengths of channel, id,
-- payload and pubsub channel, the number of channels its id is indexed under, and
-- the events its channel's history keeps, 0 for the history size of ARGV[1]),
-- those four strings, then each indexed channel as a '>H' length and its bytes.
--
-- Returns the first seq of the batch.
local k_seq, k_last, k_live, k_trim, k_floor = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local k_ids, k_times, k_dead, k_token = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local size, ttl, id_cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local token_ttl_ms, n, forget = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local blob, history_prefix = ARGV[7], ARGV[8]

if forget > 0 then redis.call('DEL', unpack(KEYS, #KEYS - forget + 1, #KEYS)) end
local done = redis.call('GET', k_token)
if done then return tonumber(done) end
start_counter(k_seq, k_floor)
local first = redis.call('INCRBY', k_seq, n) - n + 1
redis.call('SET', k_token, string.format('%d', first), 'PX', token_ttl_ms)
local now = now_ms()
local cutoff = now - ttl
local snow = string.format('%d', now)
sweep(k_live, k_last, k_trim, k_floor, k_dead, cutoff, now)
expire_ids(k_ids, k_times, cutoff)
local id_count = nil
local histories, history_order, backlogs, backlog_order = {}, {}, {}, {}
local pos = 1
local sub, unpack_header = string.sub, struct.unpack
for seq = first, first + n - 1 do
  local store, key, cl, il, pl, rl, indexed, keep
  store, key, cl, il, pl, rl, indexed, keep, pos = unpack_header('>BHHHIHHI', blob, pos)
  if keep == 0 then keep = size end
  local channel = sub(blob, pos, pos + cl - 1)
  local id = sub(blob, pos + cl, pos + cl + il - 1)
  pos = pos + cl + il
  local payload = sub(blob, pos, pos + pl - 1)
  local route = sub(blob, pos + pl, pos + pl + rl - 1)
  pos = pos + pl + rl
  local sseq = string.format('%d', seq)
  if store == 1 and keep > 0 then
    local h = histories[channel]
    if h == nil then
      h = {channel = channel, members = {}, keep = keep}
      histories[channel] = h
      table.insert(history_order, channel)
    end
    local eid = id
    if eid == '' then eid = sseq end
    table.insert(h.members, seq)
    table.insert(h.members, sseq .. ':' .. snow .. ':' .. #eid .. ':' .. eid .. payload)
    h.last = sseq
    h.keep = keep
  end
  -- Ids of events kept out of history (send_to) are indexed too, under the channels
  -- their recipient reads: a client that resumes from one is at a known position.
  if id ~= '' then
    local channels = {}
    for j = 1, indexed do
      local length
      length, pos = unpack_header('>H', blob, pos)
      channels[j] = sub(blob, pos, pos + length - 1)
      pos = pos + length
    end
    if id_count == nil then id_count = redis.call('ZCARD', k_times) end
    id_count = index_id(k_ids, k_times, id, sseq, now, channels, id_cap, id_count)
  end
  local message = sseq .. '\n' .. #id .. '\n' .. #channel .. '\n' .. id .. channel .. payload
  if key > 0 then
    -- Events for one client are kept out of history but in a short backlog of their
    -- worker, so that a worker cut off from Redis can catch up on them too.
    if backlogs[key] == nil then
      backlogs[key] = {}
      table.insert(backlog_order, key)
    end
    table.insert(backlogs[key], message)
  end
  redis.call('PUBLISH', route, message)
end
if #history_order > 0 then
  local channels, live, last = {}, {}, {}
  for i, channel in ipairs(history_order) do
    local h = histories[channel]
    channels[i] = channel
    table.insert(live, now)
    table.insert(live, h.channel)
    table.insert(last, h.channel)
    table.insert(last, h.last)
  end
  -- A channel seen for the first time in two TTLs may have had a history that expired
  -- whole: it starts with the floor as its trim mark. A channel in the dead set always
  -- has a trim mark (sweep sets both), and leaves that set now.
  local marks, fresh, known = redis.call('HMGET', k_trim, unpack(channels)), {}, {}
  local floor = redis.call('GET', k_floor) or '0'
  for i, channel in ipairs(channels) do
    if marks[i] then
      table.insert(known, channel)
    else
      table.insert(fresh, channel)
      table.insert(fresh, floor)
    end
  end
  if #known > 0 then redis.call('ZREM', k_dead, unpack(known)) end
  if #fresh > 0 then redis.call('HSET', k_trim, unpack(fresh)) end
  for _, channel in ipairs(history_order) do
    local h, hist = histories[channel], history_prefix .. channel
    redis.call('ZADD', hist, unpack(h.members))
    local count, keep = redis.call('ZCARD', hist), h.keep
    if count > keep then
      local cut = redis.call('ZRANGE', hist, count - keep - 1, count - keep - 1, 'WITHSCORES')
      redis.call('ZREMRANGEBYRANK', hist, 0, count - keep - 1)
      redis.call('HSET', k_trim, h.channel, cut[2])
    end
    redis.call('PEXPIRE', hist, ttl)
  end
  redis.call('ZADD', k_live, unpack(live))
  redis.call('HSET', k_last, unpack(last))
end
local cap = size
if cap < 1 then cap = 1 end
for _, key in ipairs(backlog_order) do
  -- key: the position in KEYS of a worker backlog, as the event's header gave it.
  local k_backlog = KEYS[key]
  redis.call('LPUSH', k_backlog, unpack(backlogs[key]))
  redis.call('LTRIM', k_backlog, 0, cap - 1)
  redis.call('PEXPIRE', k_backlog, ttl)
end
return first
