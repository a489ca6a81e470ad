-- claim: bind an admission to the one reservation request it may make.
--
-- KEYS: queue, claims (one sale slot)
-- ARGV[1] position   ARGV[2] idempotency key   ARGV[3] request fingerprint (sku, qty, payment)
-- ARGV[4] admission deadline (ms; judged by Redis TIME)
-- Returns 'ok' (first use, or the same request again), 'mismatch' (same key, other request),
-- 'used' (another key already used this admission), 'expired', 'not_admitted', or
-- 'unavailable' while Redis has lost the waiting room (until the reconciler restores it).
local queue, claims = KEYS[1], KEYS[2]
if redis.call('HEXISTS', queue, 'live') == 0 then
  return 'unavailable'
end
local p, key, print_ = ARGV[1], ARGV[2], ARGV[3]
local member = p .. SEP .. key .. SEP .. print_
local prior = redis.call('ZRANGEBYSCORE', claims, p, p, 'LIMIT', 0, 1)[1]
if prior then
  if prior == member then
    return 'ok'
  end
  local same_key = p .. SEP .. key .. SEP
  if string.sub(prior, 1, #same_key) == same_key then
    return 'mismatch'
  end
  return 'used'
end
if now_ms() > tonumber(ARGV[4]) then
  return 'expired'
end
if tonumber(p) > tonumber(redis.call('HGET', queue, 'serving') or '0') then
  return 'not_admitted'
end
redis.call('ZADD', claims, p, member)
return 'ok'
