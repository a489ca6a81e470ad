-- join: put a buyer in the sale's waiting room, once.
--
-- KEYS: sale, queue, members (one sale slot)   ARGV[1] buyer id
-- Returns {outcome, position}:
--   queued, p     p >= 1: FIFO position; p = 0: in the pre-queue (position assigned at start)
--   sold_out, 0   nothing left for a new arrival: not queued
--   full, 0       the queue holds max_queue waiting buyers: not queued
--   ended, 0      the sale is over          unavailable, 0   the sale is not preloaded
-- A buyer already queued gets the same answer (queued, same position) whatever has changed.
local sale, queue, members, buyer = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local cfg = redis.call('HMGET', sale, 'status', 'starts_at_ms', 'ends_at_ms', 'max_queue')
if not cfg[1] then
  return {'unavailable', 0}
end
local existing = redis.call('HGET', members, buyer)
if existing then
  return {'queued', tonumber(existing)}
end
local now = now_ms()
if cfg[1] == 'ended' or now >= tonumber(cfg[3]) then
  return {'ended', 0}
end
local q = redis.call('HMGET', queue, 'sold_out', 'cutoff', 'serving', 'pre')
if q[1] == '1' then
  return {'sold_out', 0}
end
local max_queue = tonumber(cfg[4])
local tail = seal_prequeue(queue, tonumber(cfg[2]), now)
if not tail then
  if tonumber(q[4] or '0') >= max_queue then
    return {'full', 0}
  end
  redis.call('HSET', members, buyer, 0)
  redis.call('HINCRBY', queue, 'pre', 1)
  return {'queued', 0}
end
-- The pump never admits beyond its cutoff, so a position past it could never be served.
local cutoff = tonumber(q[2] or '-1')  -- -1: no cutoff published yet
if cutoff >= 0 and tail >= cutoff then
  return {'sold_out', 0}
end
if tail - tonumber(q[3] or '0') >= max_queue then
  return {'full', 0}
end
tail = tail + 1
redis.call('HSET', queue, 'tail', tail)
redis.call('HSET', members, buyer, tail)
return {'queued', tail}
