-- link: a call waits for the end of call `requirement` of this group.
-- ARGV[1..4] see common.lua
-- ARGV[5] requirement  the required call's id
-- ARGV[6] tag          the dependent's group, as its hash tag "{prefix:group}"
-- ARGV[7] dependent    the waiting call's id
-- ARGV[8] future       '1': the requirement may be sent later (a workflow's own node)
-- Returns {epoch, code, state, payload, error, task}; code:
--   1 linked: the requirement has not ended (state: its state now);
--   2 it ended already (state: how; payload and error when kept; 'ENDED' when only its id is
--     remembered): the caller settles the dependent itself;
--   3 linked ahead of the requirement's send; 0 unknown here: nothing written.
local rid, entry = ARGV[5], ARGV[6] .. SEP .. ARGV[7]

local function add()
  local raw = redis.call('HGET', K_DEPENDENTS, rid)
  if raw then
    for _, e in ipairs(split(raw, RS)) do
      if e == entry then return end
    end
    raw = raw .. RS .. entry
  else
    raw = entry
  end
  redis.call('HSET', K_DEPENDENTS, rid, raw)
end

local rec = load(rid)
if rec then
  add()
  return {EPOCH, 1, rec.status or '', '', '', rec.task or ''}
end
local h = redis.call('HGET', K_HISTORY, rid)
if h then
  local doc = cjson.decode(h)
  return {EPOCH, 2, doc.state or '', doc.payload or '', doc.error or '', doc.task or ''}
end
if redis.call('ZSCORE', K_ENDED, rid) then return {EPOCH, 2, 'ENDED', '', '', ''} end
if ARGV[8] == '1' then
  add()
  return {EPOCH, 3, '', '', '', ''}
end
return {EPOCH, 0, '', '', '', ''}
