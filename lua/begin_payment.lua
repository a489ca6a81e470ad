-- begin_payment: ACTIVE -> PAYING, so the hold cannot expire while the provider charges.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox   ARGV[1] reservation id
-- Returns {ok, state, reason}: ok = 1 when the hold is (now or already) PAYING.
-- An ACTIVE hold past its deadline is expired here (stock back, reservation.expired) and
-- refused, exactly as the sweeper would have done: a late payment never revives it.
local K, id = KEYS, ARGV[1]
local h = load_hold(K, id)
if not h then
  return {0, 'UNKNOWN', 'unknown_reservation'}
end
if h.state == 'PAYING' then
  return {1, 'PAYING', 'already_paying'}
end
if h.state ~= 'ACTIVE' then
  return {0, h.state, h.state == 'SOLD' and 'already_sold' or 'released'}
end
local now = now_ms()
if now >= h.deadline then
  release_hold(K, id, h, 'expired', 'reservation.expired', now)
  return {0, 'RELEASED', 'expired'}
end
redis.call('HINCRBY', K[2], 'active', -h.qty)
redis.call('HINCRBY', K[2], 'paying', h.qty)
h.state = 'PAYING'
redis.call('HSET', K[3], id, encode_hold(h))
return {1, 'PAYING', 'ok'}
