-- keepalive: renew the leases of calls that are still running or waiting to run.
-- KEYS    see common.lua
-- ARGV[1] now_ms     int or ''
-- ARGV[2..] call ids
-- Returns the ids that hold no slot any more (their lease was lost).
local now = clock(ARGV[1])
local lost = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local rec = load(id)
  if rec and rec.s ~= 'p' then
    local start = now
    if rec.e and rec.e > now then start = rec.e end
    redis.call('ZADD', K_HOLDERS, 'GT', start + rec.l, id)
  elseif not rec or rec.s == 'p' then
    lost[#lost + 1] = id
  end
end
return lost
