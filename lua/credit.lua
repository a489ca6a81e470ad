-- credit: the second step of a stock transfer (see lend.lua), on the receiving bucket.
-- Applied once per transfer id.
--
-- KEYS[1] meta   KEYS[2] stock   KEYS[3] received (this bucket's applied transfer ids)
-- ARGV[1] transfer id   ARGV[2] units
-- Returns 'credited', 'already' (this id was credited before: nothing written) or
-- 'unavailable' (not loaded or being rebuilt: nothing written; the lender's journal keeps the
-- units and the reconciler credits them once the bucket is back).
local meta, stock, received = KEYS[1], KEYS[2], KEYS[3]
if redis.call('HEXISTS', stock, 'total') == 0 or redis.call('HEXISTS', meta, 'rebuilding') == 1
    or redis.call('EXISTS', meta) == 0 then
  return 'unavailable'
end
if redis.call('HSETNX', received, ARGV[1], ARGV[2]) == 0 then
  return 'already'
end
local units = tonumber(ARGV[2])
redis.call('HINCRBY', stock, 'available', units)
redis.call('HINCRBY', stock, 'total', units)
redis.call('HINCRBY', stock, 'moves', 1)
return 'credited'
