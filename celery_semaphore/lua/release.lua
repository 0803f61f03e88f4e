-- release: a call ended; free its slot and hand free slots to parked calls, in one step.
-- KEYS    see common.lua
-- ARGV[1] now_ms     int or ''
-- ARGV[2] call id
-- ARGV[3] fence      int, or '' to release whatever grant the call holds
-- ARGV[4] limit      int
-- Returns {released (0/1), {id, fence, message}...}: the handed-off calls to publish.
-- Releasing twice, or after the slot was reclaimed or re-granted (other fence), frees nothing.
local now = clock(ARGV[1])
local id = ARGV[2]
local fence = ARGV[3]

local released = 0
local rec = load(id)
if rec == false then
  forget(id)
  released = 1
elseif rec and rec.s ~= 'p' and (fence == '' or tonumber(fence) == rec.f) then
  forget(id)
  released = 1
end
return handoff(gate_limit(ARGV[4]), now, {released})
