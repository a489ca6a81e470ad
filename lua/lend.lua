-- lend: the first step of a stock transfer between two buckets of one SKU. Takes units from
-- this bucket's available stock and journals them under the transfer id; `credit` on the
-- receiving bucket is the second step, and removing the journal entry (HDEL) the last. A
-- transfer left half-done (a crash after this step) is finished by the reconciler, which
-- credits the journaled units by the same id: a unit is never lost or made twice.
--
-- KEYS[1] meta   KEYS[2] stock   KEYS[3] transfers (this bucket's journal)
-- ARGV[1] transfer id   ARGV[2] receiving bucket   ARGV[3] units wanted
-- ARGV[4] 'exact' to lend min(available, wanted) (add-stock spreading new units); otherwise
-- lends min(available, max(wanted, ceil(available / 2))): half of what is left, so a bucket
-- that runs dry early takes a fair share in one step, and the donor keeps the rest.
-- The journal entry is "receiving bucket SEP units SEP lent at (ms)". The answer carries
-- this bucket's `incarnation` (meta; none until the reconciler first rebuilt it after a
-- loss), which the credit carries so that a receiver refuses a credit lent by a lost one.
-- Every entry of the journal was lent by the bucket's current incarnation: a rebuild after a
-- loss starts a new one with an empty journal.
-- Returns {outcome, units lent, units that may still come back (active + paying here, and
-- one per transfer this bucket lent that is not finished yet), this bucket's incarnation}
-- where outcome is
--   'lent'         units moved to the journal (also for a repeated id: the same units)
--   'empty'        nothing available here
--   'unavailable'  the bucket is not loaded or is being rebuilt: nothing moved
local meta, stock, journal = KEYS[1], KEYS[2], KEYS[3]
local id, units = ARGV[1], 0
local c = redis.call('HMGET', stock, 'available', 'active', 'paying')
if not c[1] or redis.call('HEXISTS', meta, 'rebuilding') == 1
    or redis.call('EXISTS', meta) == 0 then
  return {'unavailable', 0, 0, ''}
end
local incarnation = redis.call('HGET', meta, 'incarnation') or ''
local held = tonumber(c[2]) + tonumber(c[3]) + redis.call('HLEN', journal)
local prior = redis.call('HGET', journal, id)
if prior then
  return {'lent', tonumber(string.match(prior, '^%d+\31(%d+)')), held, incarnation}
end
local available = tonumber(c[1])
local wanted = tonumber(ARGV[3])
if ARGV[4] == 'exact' then
  units = math.min(available, wanted)
else
  units = math.min(available, math.max(wanted, math.ceil(available / 2)))
end
if units <= 0 then
  return {'empty', 0, held, incarnation}
end
redis.call('HINCRBY', stock, 'available', -units)
redis.call('HINCRBY', stock, 'total', -units)
redis.call('HINCRBY', stock, 'moves', 1)
local t = redis.call('TIME')
redis.call('HSET', journal, id, ARGV[2] .. '\31' .. units .. '\31' .. t[1] * 1000)
return {'lent', units, held, incarnation}
