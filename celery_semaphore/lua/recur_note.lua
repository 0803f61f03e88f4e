-- recur_note: record what became of an occurrence: fired (with its task id) or skipped. The
-- schedule goes once its last occurrence is noted.
-- KEYS[1] {prefix:recurring}:schedules   KEYS[2] {prefix:recurring}:due   (see recur_add.lua)
-- ARGV[1] name   ARGV[2] task id, or '' when skipped
-- Returns 1 when the schedule is finished (and removed), else 0.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local s = cjson.decode(raw)
if ARGV[2] == '' then
  s.skipped = (s.skipped or 0) + 1
else
  s.fired = (s.fired or 0) + 1
  s.last_id = ARGV[2]
end
if s.repeats >= 0 and s.fired + (s.skipped or 0) >= s.repeats then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(s))
return 0
