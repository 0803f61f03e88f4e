-- resize: set the limit in force of a gate; raising it hands the new room out at once,
-- lowering it stops new grants until the gate is under the new limit (nothing is killed).
-- ARGV[1..3] see common.lua
-- ARGV[4] gate
-- ARGV[5] limit      int (-1: only per-key limits apply)
-- Returns {epoch, old limit or '', {id, fence, message}...}.
local name = ARGV[4]
local g = gate(name)
local old = g.limit
seed(name, ARGV[5])
g.limit = tonumber(ARGV[5])
redis.call('HSET', K_STATE, name .. ':limit', g.limit)
local out = pump({name}, {})
local r = {EPOCH, tostring(old or '')}
for _, x in ipairs(out) do r[#r + 1] = x end
return r
