-- rebuild_finish: recount a SKU from its holds, write its configuration, reopen it.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox
-- ARGV[1] stock_total (Postgres), or for one bucket of a SKU split into stock buckets: '' to
--   keep the bucket's total (it is closed, so no transfer changes it meanwhile), or '+N' for
--   the units its holds commit plus N (a lost bucket: see reconciler/buckets.py)
-- ARGV[2..] meta field/value pairs (Postgres)
-- active / paying / sold are the units of the holds in those states, available is what is
-- left of the total, and each buyer's count is their ACTIVE + PAYING + SOLD units: the
-- counters agree with the holds by construction, in one atomic step.
-- Returns {'ok', before total, available, active, paying, sold, after ...the same five} or
-- {'overcommitted', units}: the holds need more than the total (Redis granted units Postgres
-- says were sold meanwhile); nothing is written and the SKU stays closed.
local K = KEYS
local units = {ACTIVE = 0, PAYING = 0, SOLD = 0, RELEASED = 0}
local buyers, order = {}, {}
local all = redis.call('HGETALL', K[3])
for i = 2, #all, 2 do
  local h = decode_hold(all[i])
  units[h.state] = (units[h.state] or 0) + h.qty
  if h.state ~= 'RELEASED' then
    if not buyers[h.buyer] then
      order[#order + 1] = h.buyer
      buyers[h.buyer] = 0
    end
    buyers[h.buyer] = buyers[h.buyer] + h.qty
  end
end
local committed = units.ACTIVE + units.PAYING + units.SOLD
local total
if ARGV[1] == '' then
  total = tonumber(redis.call('HGET', K[2], 'total') or '0')
elseif string.sub(ARGV[1], 1, 1) == '+' then
  total = committed + tonumber(string.sub(ARGV[1], 2))
else
  total = tonumber(ARGV[1])
end
if committed > total then
  return {'overcommitted', committed - total}
end
local before = redis.call('HMGET', K[2], 'total', 'available', 'active', 'paying', 'sold')
redis.call('DEL', K[5])
if #order > 0 then
  local pairs_ = {}
  for _, buyer in ipairs(order) do
    pairs_[#pairs_ + 1] = buyer
    pairs_[#pairs_ + 1] = buyers[buyer]
  end
  redis.call('HSET', K[5], unpack(pairs_))
end
local available = total - committed
redis.call('HSET', K[2], 'total', total, 'available', available, 'active', units.ACTIVE,
  'paying', units.PAYING, 'sold', units.SOLD)
if #ARGV > 1 then
  redis.call('HSET', K[1], unpack(ARGV, 2))
end
redis.call('HDEL', K[1], 'rebuilding')
return {'ok', before[1] or -1, before[2] or -1, before[3] or -1, before[4] or -1, before[5] or -1,
  total, available, units.ACTIVE, units.PAYING, units.SOLD}
