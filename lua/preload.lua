-- preload: copy one SKU's configuration and stock from Postgres into Redis, atomically.
--
-- KEYS[1] meta hash   KEYS[2] stock hash
-- ARGV[1] force ('1' | '0')   ARGV[2] stock_total, or '' to keep the stock as it is (a bucket
--   of a SKU split into stock buckets once loaded: transfers move units between buckets, and
--   new stock arrives through grow.lua)
-- ARGV[3] '1' when this SKU was never preloaded, '0' when it was (Postgres knows)
-- ARGV[4..] meta field/value pairs
--
-- Never resets held (active, paying) or sold units: available = total - active - paying - sold.
-- Returns {outcome, total, available, active, paying, sold} where outcome is
--   'loaded'                   configuration and stock written
--   'unchanged'                Redis already holds exactly this: nothing written
--   'refused_committed'        units are held or sold and force was not given: nothing written
--   'refused_below_committed'  total would be below held + sold units: nothing written
--   'refused_lost'             the SKU was preloaded before and Redis no longer has it (or is
--                              rebuilding it): only the reconciler may rebuild it, from the
--                              orders in Postgres; loading the bare stock would oversell
local meta, stock = KEYS[1], KEYS[2]
local force = ARGV[1] == '1'
local keep = ARGV[2] == ''
local first = ARGV[3] == '1'
local FIELDS = 4

local cur = redis.call('HMGET', stock, 'total', 'available', 'active', 'paying', 'sold')
local cur_total = tonumber(cur[1])
if (not first and not cur_total) or redis.call('HEXISTS', meta, 'rebuilding') == 1 then
  return {'refused_lost', 0, 0, 0, 0, 0}
end
local available = tonumber(cur[2]) or 0
local active = tonumber(cur[3]) or 0
local paying = tonumber(cur[4]) or 0
local sold = tonumber(cur[5]) or 0
local committed = active + paying + sold
local total = keep and (cur_total or 0) or tonumber(ARGV[2])

local same = cur_total == total and available == total - committed
if same then
  for i = FIELDS, #ARGV, 2 do
    if redis.call('HGET', meta, ARGV[i]) ~= ARGV[i + 1] then
      same = false
      break
    end
  end
end
if same then
  return {'unchanged', total, available, active, paying, sold}
end
if committed > 0 and not force then
  return {'refused_committed', cur_total or 0, available, active, paying, sold}
end
if total < committed then
  return {'refused_below_committed', cur_total or 0, available, active, paying, sold}
end

redis.call('HSET', meta, unpack(ARGV, FIELDS))
redis.call('HSET', stock, 'total', total, 'available', total - committed,
  'active', active, 'paying', paying, 'sold', sold)
return {'loaded', total, total - committed, active, paying, sold}
