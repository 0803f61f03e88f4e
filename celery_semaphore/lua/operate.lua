-- operate: an operator's change to a gate, in one step, journalled.
-- ARGV[1..4] see common.lua
-- ARGV[5] op     'pause', 'resume', 'key-limit' or 'purge'
-- ARGV[6] gate
-- ARGV[7] arg    key-limit: "<key>\31<limit>" (limit '' drops the override); purge: batch size
-- ARGV[8] who    host:pid of the operator
-- Returns {epoch, n, {purged id...}, {id, fence, message, inputs}..., follow-up rows...}: n is
-- 1 for pause / resume / key-limit, and for purge the number of parked calls of the gate
-- cancelled (a purge stops after `batch`; the caller repeats it until 0).
-- Pausing keeps parked calls parked and parks new ones (room() is 0 while paused); resuming
-- hands the free room out at once, as a resize does.
local op, name, arg, who = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local g = gate(name)
local out, n, purged = {}, 1, {}
if op == 'pause' then
  redis.call('HSET', K_STATE, name .. ':paused', '1')
  g.paused = true
  journal(who, 'pause ' .. name)
elseif op == 'resume' then
  redis.call('HDEL', K_STATE, name .. ':paused')
  g.paused = false
  journal(who, 'resume ' .. name)
  pump({name}, out)
elseif op == 'key-limit' then
  local at = string.find(arg, SEP, 1, true)
  local key, limit = string.sub(arg, 1, at - 1), string.sub(arg, at + 1)
  local field = name .. SEP .. key .. ':limit'
  if limit == '' then redis.call('HDEL', K_STATE, field) else redis.call('HSET', K_STATE, field, limit) end
  journal(who, 'resize ' .. name .. ' key ' .. key .. ' -> ' .. (limit ~= '' and limit or 'configured'))
  -- Lanes blocked on this key look again; free room goes out at once.
  pump(wake({gates = {}, keys = {{name, key}}}), out)
  pump({name}, out)
else -- purge
  n = 0
  local batch, offset = tonumber(arg) or 500, 0
  while n < batch do
    local members = redis.call('ZRANGE', K_QUEUE, offset, offset + 99)
    if #members == 0 then break end
    for _, m in ipairs(members) do
      local lane_gates = split(string.sub(m, 1, (string.find(m, SEP, 1, true) or 1) - 1), ',')
      local mine = false
      for _, x in ipairs(lane_gates) do if x == name then mine = true end end
      local id = string.sub(m, #m - string.find(string.reverse(m), SEP, 1, true) + 2)
      local rec = mine and load(id)
      if rec and rec.state == 'parked' then
        finish(id, rec, 'CANCELLED', 'purge', {reason = 'purged by ' .. who})
        n = n + 1
        purged[n] = id
        if n >= batch then break end
      else
        offset = offset + 1
      end
    end
  end
  journal(who, 'purge ' .. name .. ' (' .. n .. ' calls)')
end
local r = {EPOCH, n, purged}
for _, x in ipairs(out) do r[#r + 1] = x end
for _, x in ipairs(FOLLOW) do r[#r + 1] = x end
return r
