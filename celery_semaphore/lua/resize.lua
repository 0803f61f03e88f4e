-- resize: set the limit in force of a gate; raising it hands the new room out at once,
-- lowering it stops new grants until the gate is under the new limit (nothing is killed).
-- ARGV[1..4] see common.lua
-- ARGV[5] gate
-- ARGV[6] limit      int (-1: only per-key limits apply)
-- ARGV[7] who        host:pid of the operator ('' when configuration wrote it), journalled
-- Returns {epoch, old limit or '', {id, fence, message}...}.
local name = ARGV[5]
local g = gate(name)
local old = g.limit
seed(name, ARGV[6])
g.limit = tonumber(ARGV[6])
redis.call('HSET', K_STATE, name .. ':limit', g.limit)
if (ARGV[7] or '') ~= '' then
  journal(ARGV[7], 'resize ' .. name .. ' ' .. tostring(old or '') .. ' -> ' .. ARGV[6])
end
local out = pump({name}, {})
local r = {EPOCH, tostring(old or '')}
for _, x in ipairs(out) do r[#r + 1] = x end
for _, x in ipairs(FOLLOW) do r[#r + 1] = x end
return r
