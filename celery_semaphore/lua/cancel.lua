-- cancel: a call that has not started leaves the gate and never runs; the calls that
-- required it are cancelled too.
-- ARGV[1..4] see common.lua
-- ARGV[5] call id
-- ARGV[6] window_ms  int, how long the cancelled id is remembered (a copy already sent to
--                    the broker is refused at its start)
-- ARGV[7] reason     recorded in its history
-- ARGV[8] who        host:pid of an operator, journalled ('' for the package's own cancels)
-- Returns {epoch, code, state, {id, fence, message, inputs}..., follow-up rows...}; code 1
-- cancelled (state it was in), 2 it runs now (revoke it with Celery), 0 unknown here.
local id = ARGV[5]
local out = {}
local rec = load(id)
if not rec then return {EPOCH, 0, ''} end
if rec.state == 'running' then return {EPOCH, 2, 'running'} end
local state = rec.state
local freed = {gates = {}, keys = {}}
if state == 'granted' then ungrant(id, rec, freed) end
tombstone(id, tonumber(ARGV[6]))
if (ARGV[8] or '') ~= '' then journal(ARGV[8], 'cancel ' .. id .. ' (' .. state .. ')') end
finish(id, rec, 'CANCELLED', 'cancel', {reason = ARGV[7] or ''})
pump(concat(wake(freed), promote()), out)
settle_due()
local r = {EPOCH, 1, state}
for _, g in ipairs(out) do r[#r + 1] = g end
for _, g in ipairs(FOLLOW) do r[#r + 1] = g end
return r
