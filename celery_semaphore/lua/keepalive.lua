-- keepalive: renew the leases of calls that are still running or about to run.
-- ARGV[1..4] see common.lua
-- ARGV[5] lease_ms   int, lease of a call that re-registers
-- ARGV[6..] pairs of call id and its gates (csv)
-- Returns {epoch, {id...}, {id, backend...}}: the ids that hold nothing any more, then each
-- renewed id started by a scheduler backend with that backend's name.
-- While the group recovers from lost data, a running call it does not know re-registers
-- (one unit of each of its gates), so the group counts it before admitting anyone new.
local lost, kept = {}, {}
local reregister = recovering()
for i = 6, #ARGV, 2 do
  local id = ARGV[i]
  local rec = load(id)
  if rec and (rec.state == 'granted' or rec.state == 'running') then
    local start = NOW
    if rec.ready_ms and rec.ready_ms > NOW then start = rec.ready_ms end
    redis.call('ZADD', K_HOLDERS, 'GT', start + rec.lease_ms, id)
    if rec.backend then
      kept[#kept + 1] = id
      kept[#kept + 1] = rec.backend
    end
  elseif rec and rec.state == 'parked' and rec.ahead then
    -- Held by its worker ahead of its grant (prefetch): it holds nothing yet to renew.
  elseif rec == nil and reregister then
    local gates = split(ARGV[i + 1], ',')
    local weights, keys, key_limits = {}, {}, {}
    for j = 1, #gates do
      weights[j], keys[j], key_limits[j] = 1, '', 0
    end
    grant(id, {gates = gates, weights = weights, keys = keys, key_limits = key_limits,
      priority = 0, lease_ms = tonumber(ARGV[5]), dispatches = 1, runner = 'keepalive'},
      'running')
  else
    lost[#lost + 1] = id
  end
end
return {EPOCH, lost, kept}
