-- common: helpers prepended to every script by scripts.py (Lua has no include in Redis).
--
-- Key schema of one semaphore G; every key shares the hash tag {prefix:G} (Redis Cluster):
--   KEYS[1] {prefix:G}:state    hash  epoch -> when this data set began (ms), fence -> last fencing
--                                     number, seq -> last park sequence, limit -> optional
--                                     override (resize), recover_until -> end of a recovery (ms)
--   KEYS[2] {prefix:G}:holders  zset  call id -> lease deadline (ms, Redis TIME)
--   KEYS[3] {prefix:G}:meta     hash  call id -> JSON record of a parked or holding call:
--                                     s state (p parked, g granted, r running), f fence, n slot,
--                                     b backend, l lease ms, q park order, e eta ms, w runner,
--                                     x times parked again, d seen twice
--   KEYS[4] {prefix:G}:queue    zset  parked call id -> park order
--   KEYS[5] {prefix:G}:calls    hash  call id -> message to publish (opaque to Lua); kept for a
--                                     parked call and for a handed-off call until it starts
--   KEYS[6] {prefix:G}:slots    hash  slot number -> call id holding it
--   KEYS[7] {prefix:G}:ended    zset  call id -> end time (ms) of calls that were delivered more
--                                     than once, kept for a window so a late copy is refused
--   KEYS[8] {prefix:G}:aside    hash  call id -> a parked entry that could not be published
--                                     (unreadable record or message), kept for an operator
--   KEYS[9] {prefix:G}:suspect  zset  "id runner" -> when the lease of a running call expired
--                                     with no redelivery coming; due ones are reported dropped
--   KEYS[10] {prefix:G}:free    zset  free slot numbers among 1..limit (score = number), so a
--                                     grant pops the lowest at O(log n); rebuilt when the limit
--                                     it was built for (state field free_for) changes
-- Every script takes ARGV[1] now_ms ('' for Redis TIME), ARGV[2] the epoch the client saw last
-- ('' if none), ARGV[3] recovery ms (the longest lease); its own arguments follow. Every reply
-- starts with the current epoch.
if redis.replicate_commands then redis.replicate_commands() end

local K_STATE, K_HOLDERS, K_META, K_QUEUE = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_CALLS, K_SLOTS, K_ENDED, K_ASIDE, K_SUSPECT = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local K_FREE = KEYS[10]

-- One clock for every host: Redis TIME, unless a test passes an explicit time.
local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local NOW = clock(ARGV[1])

-- The state fields every script needs, read in one command.
local STATE = redis.call('HMGET', K_STATE, 'epoch', 'recover_until', 'limit', 'free_for')
local EPOCH, RECOVER_UNTIL, LIMIT_OVERRIDE, FREE_FOR = STATE[1], STATE[2], STATE[3], STATE[4]

-- A client that saw another epoch (or none where it expected one) means the data set was
-- lost (restart without persistence, flush): slots held by calls still running are unknown,
-- so the gate admits nothing new until they re-register or the longest lease has passed.
if not EPOCH then
  EPOCH = tostring(NOW)
  redis.call('HSET', K_STATE, 'epoch', EPOCH)
end
if ARGV[2] ~= '' and ARGV[2] ~= EPOCH and redis.call('HSETNX', K_STATE, 'lost:' .. ARGV[2], NOW) == 1 then
  RECOVER_UNTIL = tostring(NOW + tonumber(ARGV[3]))
  redis.call('HSET', K_STATE, 'recover_until', RECOVER_UNTIL)
end

local function recovering()
  if not RECOVER_UNTIL then return false end
  if tonumber(RECOVER_UNTIL) > NOW then return true end
  redis.call('HDEL', K_STATE, 'recover_until')
  RECOVER_UNTIL = nil
  return false
end

-- An operator's override (resize) wins over the limit the caller was configured with.
local function gate_limit(configured)
  if LIMIT_OVERRIDE then return tonumber(LIMIT_OVERRIDE) end
  return tonumber(configured)
end

-- The free-slot set serves slots 1..limit; built once per limit (and after lost data).
local function ensure_free(limit)
  if FREE_FOR == tostring(limit) then return end
  redis.call('DEL', K_FREE)
  for i = 1, limit do
    if redis.call('HEXISTS', K_SLOTS, i) == 0 then redis.call('ZADD', K_FREE, i, i) end
  end
  FREE_FOR = tostring(limit)
  redis.call('HSET', K_STATE, 'free_for', FREE_FOR)
end

local function has_free(limit)
  ensure_free(limit)
  return redis.call('ZCARD', K_FREE) > 0
end

-- Take the lowest free slot among 1..limit, or nil.
local function take_slot(limit)
  ensure_free(limit)
  local popped = redis.call('ZPOPMIN', K_FREE)
  if #popped == 0 then return nil end
  return popped[1]
end

-- A slot a new call may take now: none while recovering from lost data.
local function admit(limit)
  if recovering() then return nil end
  return take_slot(limit)
end

-- Give slot n back (to the free set when it is one of 1..limit).
local function unslot(n)
  redis.call('HDEL', K_SLOTS, n)
  if FREE_FOR and tonumber(n) <= tonumber(FREE_FOR) then redis.call('ZADD', K_FREE, n, n) end
end

local function load(id)
  local raw = redis.call('HGET', K_META, id)
  if not raw then return nil end
  local ok, rec = pcall(cjson.decode, raw)
  if not ok or type(rec) ~= 'table' then return false end
  return rec
end

local function save(id, rec)
  redis.call('HSET', K_META, id, cjson.encode(rec))
end

local function forget(id, rec)
  if rec and rec.n then
    if redis.call('HGET', K_SLOTS, rec.n) == id then unslot(rec.n) end
  elseif rec == false then
    -- An unreadable record does not say its slot: look for it.
    local all = redis.call('HGETALL', K_SLOTS)
    for i = 1, #all, 2 do
      if all[i + 1] == id then unslot(all[i]) end
    end
  end
  redis.call('ZREM', K_HOLDERS, id)
  redis.call('ZREM', K_QUEUE, id)
  redis.call('HDEL', K_META, id)
  redis.call('HDEL', K_CALLS, id)
end

-- Make rec the holder of slot, with a fencing number that only grows per gate.
local function grant(id, rec, state, slot)
  rec.f = redis.call('HINCRBY', K_STATE, 'fence', 1)
  rec.s = state
  rec.n = slot
  redis.call('HSET', K_SLOTS, slot, id)
  local start = NOW
  if rec.e and rec.e > NOW then start = rec.e end
  redis.call('ZADD', K_HOLDERS, start + rec.l, id)
  save(id, rec)
  return rec.f
end

-- Hand free slots (1..limit) to parked calls in queue order; append {id, fence, message} per
-- grant. A parked entry without a readable record or message cannot be published: it is moved
-- aside (KEYS[8]) and returned as {id, -1, raw} for the caller to log.
local function handoff(limit, out)
  if recovering() then return out end
  while redis.call('ZCARD', K_QUEUE) > 0 and has_free(limit) do
    local id = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
    local rec = load(id)
    local message = redis.call('HGET', K_CALLS, id)
    if not rec or not message then
      local raw = (redis.call('HGET', K_META, id) or '') .. ' ' .. (message or '')
      forget(id, rec)
      redis.call('HSET', K_ASIDE, id, raw)
      out[#out + 1] = {id, -1, raw}
    else
      redis.call('ZREM', K_QUEUE, id)
      out[#out + 1] = {id, grant(id, rec, 'g', take_slot(limit)), message}
    end
  end
  return out
end
