-- start: a worker begins running a call; mark it running and renew its lease.
-- ARGV[1..4] see common.lua
-- ARGV[5] call id
-- ARGV[6] runner     who runs it (host and pid), to tell a second live execution apart
-- ARGV[7] redeliver  '1' when the broker redelivers the call if its worker dies (acks_late)
-- ARGV[8] mode       '' a start; 'u' a worker that holds the call ahead of its grant lets it go
--                    (it stops): the call is sent anew when its turn comes; 'c' the holder
--                    confirms the run a release granted it (see serve in common.lua)
-- Returns {epoch, code, fence, backend, dependents (1: calls wait for its end, so its result
-- is wanted), follow-up rows...}; code:
--   1 run it;
--   4 the call runs elsewhere right now: a duplicate delivery, do not run;
--   5 the call waits for room again (its grant expired): skip, it will be sent again;
--   7 the call holds nothing here: send it through the gate again;
--   8 the call already ended, or was cancelled: a late copy, do not run;
--   9 the call was sent ahead of its grant (prefetch) and still waits: hold it, and start
--     again once its wake list gets a token (or after a while, to look again).
local id = ARGV[5]
local function reply(code, fence, backend)
  local r = {EPOCH, code, fence, backend, redis.call('HEXISTS', K_DEPENDENTS, id)}
  for _, g in ipairs(FOLLOW) do r[#r + 1] = g end
  return r
end

local rec = load(id)
if rec == false then
  forget(id, rec)
  rec = nil
end
if rec then
  local backend = rec.backend or ''
  if rec.state == 'running' and ARGV[8] == 'c' and rec.unconfirmed and rec.runner == ARGV[6] then
    -- Granted to its holder by a release, which woke it: the run begins (the holder did not
    -- wait for this answer). Its message is no longer needed; the next call goes ahead.
    rec.unconfirmed, rec.ahead, rec.holder = nil, nil, nil
    -- Confirmed by the holder's own look (not by the token): the token must not outlive it.
    redis.call('DEL', wake_key(id))
    if rec.stored then redis.call('HDEL', K_MESSAGES, id) end
    rec.stored = nil
    save(id, rec)
    ahead_next(rec)
    return reply(1, rec.fence, backend)
  end
  if rec.state == 'running' then
    rec.seen_twice = true
    save(id, rec)
    return reply(4, rec.fence, backend)
  end
  if rec.state == 'needs' then return reply(5, 0, backend) end
  if rec.state == 'parked' or rec.state == 'waiting' then
    -- A late copy of a call whose grant expired: it may run now only if it fits.
    if ARGV[8] == 'u' then
      if rec.ahead then
        rec.ahead, rec.holder = nil, nil
        save(id, rec)
      end
      return reply(5, 0, backend)
    end
    local verdict = fits(rec, rec.lane, nil)
    if verdict ~= 'ok' and rec.ahead then
      -- A second copy (the broker's redelivery of a held call): only one holder may wait for
      -- the token. This copy is skipped; should the first holder be gone, its grant goes
      -- unconfirmed and reclaim sends the call anew.
      if rec.holder and rec.holder ~= ARGV[6] then return reply(5, 0, backend) end
      -- Held: the release that grants it hands it to this holder directly (see serve).
      if rec.holder ~= ARGV[6] or rec.redeliver ~= (ARGV[7] == '1') then
        rec.holder, rec.redeliver = ARGV[6], ARGV[7] == '1'
        save(id, rec)
      end
      return reply(9, 0, backend)
    end
    if verdict ~= 'ok' then return reply(5, 0, backend) end
    forget(id, rec)
    rec.lane, rec.seq, rec.ready_ms, rec.ahead, rec.holder = nil, nil, 0, nil, nil
    rec.runner, rec.redeliver = ARGV[6], ARGV[7] == '1'
    rec.seen_twice, rec.stored = true, nil
    return reply(1, grant(id, rec, 'running'), backend)
  end
  note(id, rec, 'RUNNING', 'start')
  rec.state = 'running'
  rec.ready_ms = 0
  rec.ahead, rec.holder = nil, nil -- a retry of it waits again as an ordinary call
  rec.runner = ARGV[6]
  rec.redeliver = ARGV[7] == '1'
  -- A message kept in Redis is not needed once the run is recorded (it cannot be sent again).
  if rec.stored then redis.call('HDEL', K_MESSAGES, id) end
  rec.stored = nil
  save(id, rec)
  redis.call('ZADD', K_HOLDERS, NOW + rec.lease_ms, id)
  ahead_next(rec)
  return reply(1, rec.fence, backend)
end
if redis.call('ZSCORE', K_ENDED, id) then return reply(8, 0, '') end
return reply(7, 0, '')
