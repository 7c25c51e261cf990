-- Shared by the init and publish scripts.
--
-- A counter that is missing (a new Redis, or one that restarted without its data)
-- starts at the server's time in microseconds, so ids keep increasing past any
-- cursor a client still holds; everything before that start counts as forgotten.
local function start_counter(k_seq, k_floor)
  if redis.call('EXISTS', k_seq) == 0 then
    local t = redis.call('TIME')
    local start = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
    redis.call('SET', k_seq, start)
    redis.call('SET', k_floor, start)
  end
end
