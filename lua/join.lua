-- join: put a batch of buyers in the sale's waiting room, each once.
--
-- KEYS: sale, queue, members (one sale slot)   ARGV: buyer ids (1..256), decided in order
-- Returns {outcome_1, position_1, outcome_2, position_2, ...}:
--   queued, p     p >= 1: FIFO position; p = 0: in the pre-queue (position assigned at start)
--   sold_out, 0   nothing left for a new arrival: not queued
--   full, 0       the queue holds max_queue waiting buyers: not queued
--   ended, 0      the sale is over
--   unavailable, 0   the sale is not preloaded, or Redis lost its waiting room (the queue
--                    hash is not `live`) and the reconciler has not restored it yet
-- A buyer already queued gets the same answer (queued, same position) whatever has changed,
-- also when the same buyer appears twice in one batch.
-- Every Redis command runs once per batch (the gateway coalesces concurrent joins).
local sale, queue, members = KEYS[1], KEYS[2], KEYS[3]
local n = #ARGV
local out = {}
local cfg = redis.call('HMGET', sale, 'status', 'starts_at_ms', 'ends_at_ms', 'max_queue')
if not cfg[1] or redis.call('HEXISTS', queue, 'live') == 0 then
  for i = 1, n do
    out[2 * i - 1], out[2 * i] = 'unavailable', 0
  end
  return out
end
local existing = redis.call('HMGET', members, unpack(ARGV))
local now = now_ms()
local ended = cfg[1] == 'ended' or now >= tonumber(cfg[3])
local q = redis.call('HMGET', queue, 'sold_out', 'cutoff', 'serving', 'pre')
local sold_out = q[1] == '1'
local max_queue = tonumber(cfg[4])
-- Sealing only when a new buyer could be queued keeps a batch of refusals read-only.
local tail = nil
if not ended and not sold_out then
  tail = seal_prequeue(queue, tonumber(cfg[2]), now)
end
local cutoff = tonumber(q[2] or '-1')  -- -1: no cutoff published yet
local serving = tonumber(q[3] or '0')
local pre = tonumber(q[4] or '0')
local seen = {}     -- buyer -> position given earlier in this batch
local writes = {}   -- members HSET arguments
local added_pre, first_tail = 0, tail
for i = 1, n do
  local buyer = ARGV[i]
  local position = existing[i] or seen[buyer]
  local outcome = 'queued'
  if position then
    position = tonumber(position)
  elseif ended then
    outcome, position = 'ended', 0
  elseif sold_out then
    outcome, position = 'sold_out', 0
  elseif not tail then  -- before the start: the pre-queue
    if pre + added_pre >= max_queue then
      outcome, position = 'full', 0
    else
      added_pre = added_pre + 1
      position = 0
      seen[buyer] = 0
      writes[#writes + 1] = buyer
      writes[#writes + 1] = 0
    end
  elseif cutoff >= 0 and tail >= cutoff then
    -- The pump never admits beyond its cutoff, so a position past it could never be served.
    outcome, position = 'sold_out', 0
  elseif tail - serving >= max_queue then
    outcome, position = 'full', 0
  else
    tail = tail + 1
    position = tail
    seen[buyer] = tail
    writes[#writes + 1] = buyer
    writes[#writes + 1] = tail
  end
  out[2 * i - 1], out[2 * i] = outcome, position
end
if #writes > 0 then
  redis.call('HSET', members, unpack(writes))
end
if added_pre > 0 then
  redis.call('HINCRBY', queue, 'pre', added_pre)
end
if tail and tail ~= first_tail then
  redis.call('HSET', queue, 'tail', tail)
end
return out
