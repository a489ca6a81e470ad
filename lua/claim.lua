-- claim: bind an admission to the request that may use it (a gateway on a Redis Cluster,
-- before the decision on the SKU's slot; see lib.lua check_claim).
--
-- KEYS: queue, claims (one sale slot)
-- ARGV[1] position   ARGV[2] idempotency key   ARGV[3] request fingerprint (sku, qty, payment)
-- ARGV[4] admission deadline (ms; judged by Redis TIME)
-- ARGV[5] 'refused': mark the claim of this request, which its decision refused (sold out,
--   over the limit), so that another request may claim the admission; only this exact claim
--   is marked, never another request's. Returns 'marked' or 'absent'.
-- ARGV[5] 'paused' (the gateway sees the sale paused): 'ok' only for a request that holds its
--   claim already (asked again, it is answered as it was), else 'paused', claiming nothing:
--   a claim made for a refusal by the sale's state would stay.
-- Returns 'ok' (first use, the same request again, or a request after a refused one),
-- 'mismatch' (same key, other request), 'used' (another request was granted with this
-- admission, or its buyer left), 'expired', 'not_admitted', or 'unavailable' while Redis has
-- lost the waiting room (until the reconciler restores it).
local queue, claims = KEYS[1], KEYS[2]
local p, key, print_ = ARGV[1], ARGV[2], ARGV[3]
local member = p .. SEP .. key .. SEP .. print_
if ARGV[5] == 'refused' then
  if redis.call('ZSCORE', claims, member) then
    write_claim(claims, p, member, member, true)
    return 'marked'
  end
  return 'absent'
end
if redis.call('HEXISTS', queue, 'live') == 0 then
  return 'unavailable'
end
local serving = tonumber(redis.call('HGET', queue, 'serving') or '0')
local refusal, prior = check_claim(claims, p, member, tonumber(ARGV[4]), serving, now_ms())
if refusal then
  return refusal
end
if prior and ARGV[5] == 'paused' then
  return 'paused'
end
if prior then
  write_claim(claims, p, member, prior, false)
end
return 'ok'
