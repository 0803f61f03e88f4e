-- recur_take: take the occurrences that are due, each by exactly one caller (two beats fire
-- each occurrence once). An occurrence missed while no tick ran is not fired late: the
-- schedule moves to its next time after now.
-- KEYS[1] {prefix:recurring}:schedules   KEYS[2] {prefix:recurring}:due   (see recur_add.lua)
-- ARGV[1] now_ms ('' for Redis TIME)   ARGV[2] batch
-- Returns {{name, schedule JSON, occurrence number}...}.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local out = {}
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do
  local raw = redis.call('HGET', KEYS[1], name)
  if not raw then
    redis.call('ZREM', KEYS[2], name)
  else
    local s = cjson.decode(raw)
    local n = (s.taken or 0) + 1
    repeat s.next_ms = s.next_ms + s.every_ms until s.next_ms > now
    s.taken = n
    out[#out + 1] = {name, raw, n}
    if s.repeats >= 0 and n >= s.repeats then
      redis.call('ZREM', KEYS[2], name)
    else
      redis.call('ZADD', KEYS[2], s.next_ms, name)
    end
    redis.call('HSET', KEYS[1], name, cjson.encode(s))
  end
end
return out
