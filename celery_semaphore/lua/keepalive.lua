-- keepalive: renew the leases of calls that are still running or waiting to run.
-- ARGV[1..3] see common.lua
-- ARGV[4] limit      int
-- ARGV[5] lease_ms   int, lease of a call that re-registers
-- ARGV[6..] call ids
-- Returns {epoch, {id...}, {id, backend...}}: the ids that hold no slot any more (their lease
-- was lost), then each renewed id started by a scheduler backend with that backend's name.
-- While the gate recovers from lost data, a running call it does not know re-registers and
-- takes a free slot again, so the gate counts it before admitting anyone new.
local limit = gate_limit(ARGV[4])
local lost, kept = {}, {}
local reregister = recovering()
for i = 6, #ARGV do
  local id = ARGV[i]
  local rec = load(id)
  if rec and rec.s ~= 'p' then
    local start = NOW
    if rec.e and rec.e > NOW then start = rec.e end
    redis.call('ZADD', K_HOLDERS, 'GT', start + rec.l, id)
    if rec.b then
      kept[#kept + 1] = id
      kept[#kept + 1] = rec.b
    end
  elseif rec == nil and reregister and has_free(limit) then
    grant(id, {l = tonumber(ARGV[5]), e = 0, x = 1, w = 'keepalive'}, 'r', take_slot(limit))
  else
    lost[#lost + 1] = id
  end
end
return {EPOCH, lost, kept}
