-- retire: take a SKU (one stock bucket of it) out of Redis, only if nobody ever reserved it.
--
-- KEYS[1] meta  KEYS[2] stock  KEYS[3] holds  KEYS[4] deadlines  KEYS[5] buyers  KEYS[6] idem
-- KEYS[7] outbox  KEYS[8] transfers
-- Refuses, writing nothing, while any unit is held or sold, any hold record or transfer
-- exists, or an event waits in the outbox: such a SKU has (or will have) orders. Returns
-- 'retired' (every key deleted), 'absent' (not loaded: nothing to delete) or 'refused_<why>'.
local s = redis.call('HMGET', KEYS[2], 'total', 'active', 'paying', 'sold')
if not s[1] and redis.call('EXISTS', KEYS[1]) == 0 then
  return 'absent'
end
for i = 2, 4 do
  if (tonumber(s[i]) or 0) > 0 then
    return 'refused_held'
  end
end
if redis.call('HLEN', KEYS[3]) > 0 then
  return 'refused_holds'
end
if redis.call('XLEN', KEYS[7]) > 0 then
  return 'refused_outbox'
end
if redis.call('EXISTS', KEYS[8]) == 1 then
  return 'refused_transfers'
end
redis.call('DEL', unpack(KEYS))
return 'retired'
