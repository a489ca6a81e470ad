-- archive: once a sale has ended, delete what only a running sale needs, keeping what
-- answers for it afterwards (reconciler/archive.py).
--
-- One stock bucket of a SKU (ARGV[1] = 'sku'): KEYS meta, stock, outbox, transfers, then the
--   keys deleted: holds, deadlines, buyers, idem, received. The meta and stock hashes stay, so
--   reserves and the sale's page go on answering "ended" and the counts; the outbox stream
--   (empty) stays with the relay's consumer group on it.
-- The waiting room (ARGV[1] = 'room'): KEYS sale, then the keys deleted: members, steps,
--   claims. The sale and queue hashes stay, so joins and polls go on answering "ended".
-- Refuses, writing nothing, unless KEYS[1] says the sale ended (its status, or Redis TIME past
-- its ends_at_ms); for a SKU also while a unit is held or being paid, an event waits in the
-- outbox, or a stock transfer is unfinished. Returns 'archived', 'absent' (KEYS[1] missing:
-- nothing loaded, or archived and then lost) or 'refused_<why>'. Re-runnable.
-- ARGV[2] = 'check': the checks alone, 'ready' where it would archive (nothing deleted).
local cfg = redis.call('HMGET', KEYS[1], 'status', 'ends_at_ms')
if not cfg[1] then
  return 'absent'
end
if cfg[1] ~= 'ended' and now_ms() < tonumber(cfg[2]) then
  return 'refused_not_ended'
end
local first = 2
if ARGV[1] == 'sku' then
  local s = redis.call('HMGET', KEYS[2], 'active', 'paying')
  if (tonumber(s[1]) or 0) > 0 or (tonumber(s[2]) or 0) > 0 then
    return 'refused_held'
  end
  if redis.call('XLEN', KEYS[3]) > 0 then
    return 'refused_outbox'
  end
  if redis.call('HLEN', KEYS[4]) > 0 then
    return 'refused_transfers'
  end
  first = 5
end
if ARGV[2] == 'check' then
  return 'ready'
end
redis.call('DEL', unpack(KEYS, first))
return 'archived'
