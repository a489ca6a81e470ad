-- confirm: PAYING -> SOLD. The units stay counted against the buyer's limit.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox   ARGV[1] reservation id
-- Returns {ok, state, reason}: ok = 1 when the hold is (now or already) SOLD.
local K, id = KEYS, ARGV[1]
local h = load_hold(K, id)
if not h then
  return {0, 'UNKNOWN', 'unknown_reservation'}
end
if h.state == 'SOLD' then
  return {1, 'SOLD', 'already_sold'}
end
if h.state ~= 'PAYING' then
  return {0, h.state, h.state == 'ACTIVE' and 'not_paying' or 'released'}
end
redis.call('HINCRBY', K[2], 'paying', -h.qty)
redis.call('HINCRBY', K[2], 'sold', h.qty)
h.state = 'SOLD'
redis.call('HSET', K[3], id, encode_hold(h))
return {1, 'SOLD', 'ok'}
