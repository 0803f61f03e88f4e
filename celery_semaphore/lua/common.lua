-- common: helpers prepended to every script by scripts.py (Lua has no include in Redis).
--
-- Key schema of one semaphore G, all keys sharing the hash tag {prefix:G}:
--   KEYS[1] {prefix:G}:state    hash  fence -> last fencing number, seq -> last park sequence,
--                                     limit -> optional override of the configured limit
--   KEYS[2] {prefix:G}:holders  zset  call id -> lease deadline (ms, Redis TIME)
--   KEYS[3] {prefix:G}:meta     hash  call id -> JSON record of a parked or holding call:
--                                     s state (p parked, g granted, r running), f fence,
--                                     l lease ms, q queue score, e eta ms, w runner, x re-parked count
--   KEYS[4] {prefix:G}:queue    zset  parked call id -> score (park order)
--   KEYS[5] {prefix:G}:calls    hash  call id -> message to publish (opaque to Lua); kept for a
--                                     parked call and for a handed-off call until it starts
-- Per-call data lives only as fields of these keys, so a gate at rest has just its state hash.
if redis.replicate_commands then redis.replicate_commands() end

local K_STATE, K_HOLDERS, K_META, K_QUEUE, K_CALLS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

-- One clock for every host: Redis TIME, unless a test passes an explicit time.
local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- An operator's override (resize) wins over the limit the caller was configured with.
local function gate_limit(configured)
  local override = redis.call('HGET', K_STATE, 'limit')
  if override then return tonumber(override) end
  return tonumber(configured)
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

local function forget(id)
  redis.call('ZREM', K_HOLDERS, id)
  redis.call('ZREM', K_QUEUE, id)
  redis.call('HDEL', K_META, id)
  redis.call('HDEL', K_CALLS, id)
end

-- Make rec the holder of a slot, with a fencing number that only grows per gate.
local function grant(id, rec, now, state)
  rec.f = redis.call('HINCRBY', K_STATE, 'fence', 1)
  rec.s = state
  local start = now
  if rec.e and rec.e > now then start = rec.e end
  redis.call('ZADD', K_HOLDERS, start + rec.l, id)
  save(id, rec)
  return rec.f
end

-- Hand free slots to parked calls in queue order; append {id, fence, message} per grant.
-- A parked entry without a readable record or message cannot be published: it is moved
-- to the malformed list (returned as {id, -1, raw}) so the caller can log it.
local function handoff(limit, now, out)
  while redis.call('ZCARD', K_HOLDERS) < limit do
    local head = redis.call('ZRANGE', K_QUEUE, 0, 0)
    if #head == 0 then break end
    local id = head[1]
    redis.call('ZREM', K_QUEUE, id)
    local rec = load(id)
    local message = redis.call('HGET', K_CALLS, id)
    if not rec or not message then
      local raw = redis.call('HGET', K_META, id) or ''
      redis.call('HDEL', K_META, id)
      redis.call('HDEL', K_CALLS, id)
      out[#out + 1] = {id, -1, raw}
    else
      out[#out + 1] = {id, grant(id, rec, now, 'g'), message}
    end
  end
  return out
end
