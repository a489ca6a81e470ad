-- rebuild_holds: write hold records the reconciler derived from Postgres, compare-and-set.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox
-- ARGV[1..4] sale_id, sku, unit_price, currency (for re-driven reservation.created entries)
-- then 6 values per hold: id, expected, record, idem_field, idem_value, redrive
--   expected   '' = write only if Redis has no hold under id; else the exact record Redis must
--              still hold (a hold that moved since the reconciler read it is left alone; the
--              next pass looks again)
--   record     the hold record to write (lib.lua's format)
--   idem_field/idem_value   the buyer's remembered answer, written if absent ('' = none)
--   redrive    '1' = also append a reservation.created outbox entry for it, so the order
--              saga picks the reservation up again (an order Redis had lost the hold of)
-- An ACTIVE record gets a deadline-index member, so the sweeper expires it on time.
-- Returns {written, skipped id...}.
local K = KEYS
local header = {ARGV[1], ARGV[2], ARGV[3], ARGV[4]}
local writes, skipped, redrive, idem = {}, {}, {}, {}
local written = 0
for i = 5, #ARGV, 6 do
  local id, expected, record = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local current = redis.call('HGET', K[3], id)
  local ok
  if expected == '' then
    ok = not current
  else
    ok = current == expected
  end
  if ok then
    writes[#writes + 1] = id
    writes[#writes + 1] = record
    written = written + 1
    if ARGV[i + 3] ~= '' then
      idem[#idem + 1] = {ARGV[i + 3], ARGV[i + 4]}
    end
    local h = hold_head(record)
    if h.state == 'ACTIVE' then
      redis.call('ZADD', K[4], h.deadline, id)
    end
    if ARGV[i + 5] == '1' then
      redrive[#redrive + 1] = id
      redrive[#redrive + 1] = record
    end
  else
    skipped[#skipped + 1] = id
  end
end
if #writes > 0 then
  redis.call('HSET', K[3], unpack(writes))
end
for _, pair in ipairs(idem) do
  redis.call('HSETNX', K[6], pair[1], pair[2])
end
if #redrive > 0 then
  redis.call('XADD', K[7], '*', 'type', 'reservation.created', 'sale_id', header[1],
    'sku', header[2], 'unit_price', header[3], 'currency', header[4], 'count', #redrive / 2,
    unpack(redrive))
end
table.insert(skipped, 1, written)
return skipped
