-- recur_add: store a recurring schedule, due at once (its first occurrence fires at the next
-- tick), unless the name is taken and replace is not asked.
-- KEYS[1] {prefix:recurring}:schedules  hash  name -> JSON schedule (signature, every_ms,
--                                              repeats (-1 forever), overlap, fired, skipped,
--                                              last_id, next_ms)
-- KEYS[2] {prefix:recurring}:due        zset  name -> when its next occurrence is due (ms)
-- ARGV[1] now_ms ('' for Redis TIME)   ARGV[2] name   ARGV[3] schedule JSON   ARGV[4] '1' replace
-- Returns 1 when stored, 0 when the name is taken.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
if ARGV[4] ~= '1' and redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return 0 end
local schedule = cjson.decode(ARGV[3])
schedule.next_ms = now
redis.call('HSET', KEYS[1], ARGV[2], cjson.encode(schedule))
redis.call('ZADD', KEYS[2], now, ARGV[2])
return 1
