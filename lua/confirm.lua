-- confirm: PAYING -> SOLD. The units stay counted against the buyer's limit.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox   ARGV: reservation ids (1..n)
-- Returns {ok, state, reason} per id, flattened: ok = 1 when the hold is (now or already) SOLD.
-- Ids are decided in order; an id given twice sees its own earlier outcome.
local K = KEYS
local n = #ARGV
local raw = redis.call('HMGET', K[3], unpack(ARGV))
local holds, dirty, order = {}, {}, {}
local moved = 0
local out = {}
for i = 1, n do
  local id = ARGV[i]
  local h = holds[id]
  if h == nil then
    h = raw[i] and decode_hold(raw[i]) or false
    holds[id] = h
  end
  local ok, state, reason
  if not h then
    ok, state, reason = 0, 'UNKNOWN', 'unknown_reservation'
  elseif h.state == 'SOLD' then
    ok, state, reason = 1, 'SOLD', dirty[id] and 'ok' or 'already_sold'
  elseif h.state ~= 'PAYING' then
    ok, state, reason = 0, h.state, h.state == 'ACTIVE' and 'not_paying' or 'released'
  else
    h.state = 'SOLD'
    moved = moved + h.qty
    dirty[id] = true
    order[#order + 1] = id
    ok, state, reason = 1, 'SOLD', 'ok'
  end
  out[3 * i - 2], out[3 * i - 1], out[3 * i] = ok, state, reason
end
if moved > 0 then
  redis.call('HINCRBY', K[2], 'paying', -moved)
  redis.call('HINCRBY', K[2], 'sold', moved)
  local writes = {}
  for _, id in ipairs(order) do
    writes[#writes + 1] = id
    writes[#writes + 1] = encode_hold(holds[id])
  end
  redis.call('HSET', K[3], unpack(writes))
end
return out
