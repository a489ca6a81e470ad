-- credit: the second step of a stock transfer (see lend.lua), on the receiving bucket.
-- Applied once per transfer id.
--
-- KEYS[1] meta   KEYS[2] stock   KEYS[3] received (this bucket's applied transfer ids)
-- ARGV[1] transfer id   ARGV[2] units   ARGV[3] the lending bucket   ARGV[4] its incarnation
-- when it lent (lend.lua)
-- Returns 'credited', 'already' (this id was credited before: nothing written),
-- 'unavailable' (not loaded or being rebuilt: nothing written; the lender's journal keeps the
-- units and the reconciler credits them once the bucket is back) or 'void': the lender lost
-- its data and was rebuilt since it lent, counting these units back as its own; the
-- reconciler wrote its new incarnation here (meta `lender:<bucket>`) before it counted.
local meta, stock, received = KEYS[1], KEYS[2], KEYS[3]
if redis.call('HEXISTS', stock, 'total') == 0 or redis.call('HEXISTS', meta, 'rebuilding') == 1
    or redis.call('EXISTS', meta) == 0 then
  return 'unavailable'
end
if redis.call('HEXISTS', received, ARGV[1]) == 1 then
  return 'already'
end
local fence = redis.call('HGET', meta, 'lender:' .. ARGV[3])
if fence and fence ~= ARGV[4] then
  return 'void'
end
redis.call('HSET', received, ARGV[1], ARGV[2])
local units = tonumber(ARGV[2])
redis.call('HINCRBY', stock, 'available', units)
redis.call('HINCRBY', stock, 'total', units)
redis.call('HINCRBY', stock, 'moves', 1)
return 'credited'
