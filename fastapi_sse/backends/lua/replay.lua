-- What history holds after a cursor on some channels. Assembled after sweep.lua.
--
-- KEYS[1] the seq counter, KEYS[2] last (hash: channel -> its last stored seq),
-- KEYS[3] live (sorted set: channel scored by the time of its last event),
-- KEYS[4] trim (hash: channel -> seq its history was trimmed to), KEYS[5] the floor,
-- KEYS[6] dead (sorted set of channels whose history expired whole),
-- then KEYS[7], KEYS[8], ... the history key of each channel, in the order of ARGV.
-- ARGV[1] the cursor (after), ARGV[2] the history TTL in ms, then ARGV[3], ARGV[4],
-- ... the channels.
--
-- Returns the head, the gaps, the entries after the cursor and each channel's floor
-- (its history is complete after it), so that one read serves later cursors too.
local k_seq, k_last, k_live, k_trim, k_floor, k_dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local after_text, ttl = ARGV[1], tonumber(ARGV[2])
local after = tonumber(after_text)
local first_history_key, first_channel_arg = 7, 3

local now = now_ms()
local cutoff = now - ttl
sweep(k_live, k_last, k_trim, k_floor, k_dead, cutoff, now)
local floor = tonumber(redis.call('GET', k_floor) or '0')
local gaps, found, floors = {}, {}, {}
for i = 0, #ARGV - first_channel_arg do
  local channel, hist = ARGV[first_channel_arg + i], KEYS[first_history_key + i]
  expire_entries(hist, k_trim, channel, cutoff)
  local trim = redis.call('HGET', k_trim, channel)
  local held = redis.call('EXISTS', hist) == 1
  local mark = tonumber(trim or '0')
  if not held then
    mark = floor
    if trim then mark = math.max(tonumber(trim), tonumber(redis.call('HGET', k_last, channel) or '0')) end
  end
  table.insert(floors, string.format('%d', mark))
  if mark > after then
    table.insert(gaps, channel)
  elseif held then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', hist, '(' .. after_text, '+inf')) do
      table.insert(found, channel)
      table.insert(found, m)
    end
  end
end
return {redis.call('GET', k_seq) or '0', gaps, found, floors}
