-- join: put a batch of buyers in the sale's waiting room, each once.
--
-- KEYS: sale, queue, members, claims (one sale slot)   ARGV: buyer ids (1..256), in order
-- Returns {outcome_1, position_1, outcome_2, position_2, ...}:
--   queued, p     p >= 1: FIFO position; p = 0: in the pre-queue (position assigned at start)
--   left, p       the buyer gave place p up (leave.lua): it stays given up
--   sold_out, 0   nothing left for a new arrival: not queued
--   full, 0       the queue holds max_queue waiting buyers: not queued
--   ended, 0      the sale is over
--   unavailable, 0   the sale is not preloaded, or Redis lost its waiting room (the queue
--                    hash is not `live`) and the reconciler has not restored it yet
-- A buyer already queued gets the same answer (queued, same position) whatever has changed,
-- also when the same buyer appears twice in one batch.
-- Every Redis command runs once per batch (the gateway coalesces concurrent joins).
--
-- The rate limits (the gateway on a single Redis node, where one script may touch the sale's
-- keys and the rate-limit keys: one round trip per join instead of two). With more than 4
-- KEYS: KEYS[5..] the rate-limit keys of the batch (each once), and ARGV is the n buyers, then
-- for each buyer the KEYS index of its per-IP key, then of its per-buyer key (0 = none), then
-- four numbers: per-IP emission interval and burst tolerance, the same per buyer (us). Each
-- join is first counted against its limits (lib.lua rate_gate); one over a limit is answered
--   rate_limited, <us until allowed>   and not joined.
local sale, queue, members, claims = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local gated = #KEYS > 4
local n = gated and (#ARGV - 4) / 3 or #ARGV
local out = {}
local cfg = redis.call('HMGET', sale, 'status', 'starts_at_ms', 'ends_at_ms', 'max_queue')
if not cfg[1] or redis.call('HEXISTS', queue, 'live') == 0 then
  for i = 1, n do
    out[2 * i - 1], out[2 * i] = 'unavailable', 0
  end
  return out
end
-- The wait (us) of join i under its rate limits: 0 when allowed and counted.
local limited = function(_) return 0 end
local save_rates = nil
if gated then
  limited, save_rates = rate_gate(KEYS, ARGV, n, 2 * n, 3 * n)
end
local existing = redis.call('HMGET', members, unpack(ARGV, 1, n))
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
-- Whether the buyer of place p gave it up: its claim is the one leave.lua writes.
local function left_at(p)
  local claim = redis.call('ZRANGEBYSCORE', claims, p, p, 'LIMIT', 0, 1)[1]
  return claim == p .. SEP .. SEP .. 'left'
end
local seen = {}     -- buyer -> position given earlier in this batch
local writes = {}   -- members HSET arguments
local added_pre, first_tail = 0, tail
for i = 1, n do
  local buyer = ARGV[i]
  local position = existing[i] or seen[buyer]
  local outcome = 'queued'
  local wait = limited(i)
  if wait > 0 then
    outcome, position = 'rate_limited', wait
  elseif position then
    position = tonumber(position)
    if position > 0 and left_at(position) then
      outcome = 'left'
    end
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
if save_rates then
  save_rates()
end
return out
