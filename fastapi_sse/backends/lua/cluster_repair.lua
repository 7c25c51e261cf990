-- After a failover, what a worker saw of a tag that its new master lacks: writes the
-- old master acknowledged and did not pass on. The tag's sequence moves past them
-- and the channels' histories count as complete only after them, so a resume from
-- before them gets a gap instead of missing them silently.
--
-- ARGV[1] the tag's key base, ARGV[2] the newest seq the worker saw, ARGV[3] the
-- history TTL in ms, then ARGV[4], ... the channels of the tag it listens to.
-- KEYS[1] the tag's sequence key (the base and ":s").
--
-- Returns 1 when the master lacked them (and was repaired), else 0.
local base, seen, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local k_seq = KEYS[1]
local last = tonumber(redis.call('GET', k_seq) or '0')
if last >= seen then return 0 end
local sseen = string.format('%d', seen)
redis.call('SET', k_seq, sseen, 'PX', ttl)
local k_marks = base .. ':m'
for i = 4, #ARGV do
  local mark = tonumber(redis.call('HGET', k_marks, ARGV[i]) or '0')
  if mark < seen then redis.call('HSET', k_marks, ARGV[i], sseen) end
end
redis.call('PEXPIRE', k_marks, ttl)
return 1
