-- reserve: decide a batch of N reservation requests for one SKU, independently and in order.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox
-- ARGV[1] = N; then per request 6 fields:
--   reservation_id (fresh, used only if granted), buyer_id, quantity, idempotency_key,
--   payment_ref, admission_id
-- Returns N strings "outcome\31a\31b":
--   reserved\31<id>\31<deadline_ms>       granted (or replayed: same key, same answer)
--   sold_out\31<0|1>                      1 = active or paying holds may still return stock
--   limit_exceeded\31<units already counted>
--   idempotency_mismatch                  same key, different quantity or payment
--   not_started | paused | ended | unavailable (not preloaded / lost) | invalid_quantity
-- Granted, sold_out and limit_exceeded answers are remembered per (buyer, key) and replayed
-- unchanged; answers about the sale's state are not, so a retry after the start can succeed.
local K = KEYS
local n = tonumber(ARGV[1])
local results = {}

local meta = redis.call('HMGET', K[1], 'status', 'starts_at_ms', 'ends_at_ms',
  'per_buyer_limit', 'hold_ttl_ms', 'price', 'currency', 'sale_id', 'sku')
local now = now_ms()
local gate = nil
if not meta[1] then
  gate = 'unavailable'
elseif meta[1] == 'ended' or now >= tonumber(meta[3]) then
  gate = 'ended'
elseif meta[1] == 'paused' then
  gate = 'paused'
elseif now < tonumber(meta[2]) then
  gate = 'not_started'
end
local limit = tonumber(meta[4])
local ttl = tonumber(meta[5])

for i = 0, n - 1 do
  local b = 2 + i * 6
  local id, buyer, qty = ARGV[b], ARGV[b + 1], tonumber(ARGV[b + 2])
  local idem, payref, admission = ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
  local idem_field = buyer .. SEP .. idem
  local fingerprint = ARGV[b + 2] .. SEP .. payref
  local seen = redis.call('HGET', K[6], idem_field)
  local answer
  if seen then
    local sep_at = string.find(seen, '\30', 1, true)
    if string.sub(seen, 1, sep_at - 1) ~= fingerprint then
      answer = 'idempotency_mismatch'
    else
      answer = string.sub(seen, sep_at + 1)
    end
  elseif gate then
    answer = gate
  elseif not qty or qty < 1 or qty ~= math.floor(qty) then
    answer = 'invalid_quantity'
  else
    local counted = tonumber(redis.call('HGET', K[5], buyer) or '0')
    local available = tonumber(redis.call('HGET', K[2], 'available'))
    if counted + qty > limit then
      answer = 'limit_exceeded' .. SEP .. counted
    elseif available < qty then
      local s = redis.call('HMGET', K[2], 'active', 'paying')
      local pending = (tonumber(s[1]) + tonumber(s[2])) > 0 and '1' or '0'
      answer = 'sold_out' .. SEP .. pending
    else
      local deadline = now + ttl
      redis.call('HINCRBY', K[2], 'available', -qty)
      redis.call('HINCRBY', K[2], 'active', qty)
      redis.call('HINCRBY', K[5], buyer, qty)
      redis.call('HSET', K[3], id, encode_hold({state = 'ACTIVE', buyer = buyer, qty = qty,
        deadline = deadline, idem = idem, payref = payref, admission = admission,
        created = now, cause = ''}))
      redis.call('ZADD', K[4], deadline, id)
      redis.call('XADD', K[7], '*', 'type', 'reservation.created', 'reservation_id', id,
        'sale_id', meta[8], 'sku', meta[9], 'buyer_id', buyer, 'quantity', qty,
        'unit_price', meta[6], 'amount', tonumber(meta[6]) * qty, 'currency', meta[7],
        'payment_ref', payref, 'admission_id', admission, 'idempotency_key', idem,
        'hold_deadline_ms', deadline, 'created_ms', now)
      answer = 'reserved' .. SEP .. id .. SEP .. deadline
    end
    redis.call('HSET', K[6], idem_field, fingerprint .. '\30' .. answer)
  end
  results[i + 1] = answer
end
return results
