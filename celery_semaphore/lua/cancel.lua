-- cancel: a call that has not started leaves the gate and never runs.
-- ARGV[1..3] see common.lua
-- ARGV[4] call id
-- ARGV[5] window_ms  int, how long the cancelled id is remembered (a copy already sent to
--                    the broker is refused at its start)
-- Returns {epoch, code, state, {id, fence, message}...}; code 1 cancelled (state it was in),
-- 2 it runs now (revoke it with Celery), 0 unknown here.
local id = ARGV[4]
local out = {}
local rec = load(id)
if not rec then return {EPOCH, 0, ''} end
if rec.state == 'running' then return {EPOCH, 2, 'running'} end
local state = rec.state
local freed = {gates = {}, keys = {}}
if state == 'granted' then ungrant(id, rec, freed) end
tombstone(id, tonumber(ARGV[5]))
forget(id, rec)
pump(concat(wake(freed), promote()), out)
local r = {EPOCH, 1, state}
for _, g in ipairs(out) do r[#r + 1] = g end
return r
