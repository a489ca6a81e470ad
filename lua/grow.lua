-- grow: bring a bucketed SKU's stock up to the total Postgres holds, on bucket 0.
--
-- Bucket 0's meta field `stock_total` is the SKU's total as Redis has been given it (the sum
-- over the buckets' totals and the units in transfer). Raising it adds the difference to
-- bucket 0's stock, from where buckets that run dry borrow it. Monotone and idempotent:
-- repeats, and two add-stocks applied in either order, converge on the highest total.
--
-- KEYS[1] meta   KEYS[2] stock (bucket 0)   ARGV[1] the SKU's stock total in Postgres
-- Returns {outcome, the SKU's total in Redis afterwards}: outcome 'grown', 'unchanged', or
-- 'unavailable' (not loaded or being rebuilt: nothing written).
local meta, stock = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'stock_total', 'rebuilding')
if not m[1] or m[2] or redis.call('HEXISTS', stock, 'total') == 0 then
  return {'unavailable', 0}
end
local granted, wanted = tonumber(m[1]), tonumber(ARGV[1])
if wanted <= granted then
  return {'unchanged', granted}
end
redis.call('HINCRBY', stock, 'available', wanted - granted)
redis.call('HINCRBY', stock, 'total', wanted - granted)
redis.call('HINCRBY', stock, 'moves', 1)
redis.call('HSET', meta, 'stock_total', wanted)
return {'grown', wanted}
