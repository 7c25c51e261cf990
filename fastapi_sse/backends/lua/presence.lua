-- Presence on a channel: a hash per channel, <prefix>pres:<channel>, whose fields
-- are "<worker id>\n<identity>" and values that worker's streams of that identity;
-- the set <prefix>pres holds the channels that have one. A field of a worker whose
-- registration key (<worker prefix><worker id>) expired counts for nothing and is
-- dropped where it is met. These functions come before present.lua, presence_get.lua
-- and absent.lua.

-- identity -> streams across live workers; drops the fields of dead workers and
-- returns, beside the totals, the totals the dead fields held.
local function tally(k_presence, k_worker_prefix)
  local live, dead, alive = {}, {}, {}
  local fields = redis.call('HGETALL', k_presence)
  local gone = {}
  for i = 1, #fields, 2 do
    local worker, identity = string.match(fields[i], '^([^\n]*)\n(.*)$')
    local streams = tonumber(fields[i + 1])
    if alive[worker] == nil then
      alive[worker] = redis.call('EXISTS', k_worker_prefix .. worker) == 1
    end
    if alive[worker] then
      live[identity] = (live[identity] or 0) + streams
    else
      dead[identity] = (dead[identity] or 0) + streams
      table.insert(gone, fields[i])
    end
  end
  if #gone > 0 then redis.call('HDEL', k_presence, unpack(gone)) end
  return live, dead
end
