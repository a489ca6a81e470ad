-- leave: a buyer gives up their place in the waiting room.
--
-- KEYS: queue, claims (one sale slot)   ARGV[1] the buyer's position (>= 1)
-- The place is marked used, with an empty idempotency key and the fingerprint 'left' (see
-- claim.lua), so no request can claim its admission and the pump counts it among the used
-- admissions instead of waiting for the buyer.
-- Returns 'left', 'already_left', 'reserved' (a request already used the admission: too late
-- to leave; cancel the reservation instead) or 'unavailable' (the room is being restored).
if redis.call('HEXISTS', KEYS[1], 'live') == 0 then
  return 'unavailable'
end
local p = ARGV[1]
local left = p .. SEP .. SEP .. 'left'
local prior = redis.call('ZRANGEBYSCORE', KEYS[2], p, p, 'LIMIT', 0, 1)[1]
if prior and string.sub(prior, -#REFUSED) ~= REFUSED then  -- a refused request used nothing
  return prior == left and 'already_left' or 'reserved'
end
write_claim(KEYS[2], p, left, prior or '', false)
return 'left'
