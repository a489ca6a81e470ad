-- reserve: decide a batch of N reservation requests for one SKU, independently and in order.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox
-- ARGV[1] = N, then six columns of N values each, request i being the i-th of every column:
--   reservation_id (fresh, used only if granted), buyer_id, quantity, payment_ref,
--   admission_id, idem_field (buyer_id \31 idempotency_key: the request's idempotency scope)
-- Returns N strings "outcome\31a\31b":
--   reserved\31<id>\31<deadline_ms>       granted (or replayed: same key, same answer)
--   sold_out\31<0|1>[\31<left>]            1 = active or paying holds may still return stock;
--                                         left: the units free, fewer than asked (left out
--                                         when none is; in a SKU of stock buckets, this
--                                         bucket's: the allocator says it once no other
--                                         bucket has a unit to lend)
--   limit_exceeded\31<units already counted>
--   idempotency_mismatch                  same key, different quantity or payment
--   not_started | paused | ended | invalid_quantity
--   unavailable                           not preloaded, lost by Redis, or being rebuilt by
--                                         the reconciler: never a wrong sold_out
-- Granted, sold_out, limit_exceeded and invalid_quantity answers are remembered per
-- idem_field and replayed unchanged; answers about the sale's state are not, so a retry after
-- the start can succeed. In a SKU split into stock buckets (meta `buckets` > 1) sold_out is
-- not remembered either: it says only that this bucket is empty, and the allocator borrows
-- stock from another bucket and asks again (see allocator/sku_allocator.py).
--
-- The admission gate (the gateway on a single Redis node, where one script may touch the sale's
-- keys and the SKU's: rate limit, admission claim and allocation in one round trip). With
-- more than 7 KEYS: KEYS[8] queue, KEYS[9] claims (the sale's), KEYS[10..] the rate-limit keys
-- of the batch (each once), and four more columns of N values after the six:
--   claim member (position \31 idempotency key \31 fingerprint; '' = no gate), admission
--   deadline (ms; 0 = the request passed the gate before and is asked again after a stock
--   transfer: neither counted nor judged again, only claimed), and the KEYS index of the
--   request's per-IP and per-buyer rate key (0 = none)
-- then four numbers: per-IP emission interval and burst tolerance, the same per buyer (us).
-- Each request is first counted against its rate limits (GCRA, as lua/ratelimit.lua), then
-- its claim is checked (lib.lua check_claim), then it is decided as below, and its claim
-- written: as it is for a grant, marked refused for a refusal that is remembered (sold out,
-- over the limit), nothing for a refusal by the sale's state. Refusals of the gate:
--   rate_limited\31<us until allowed>, admission_used, admission_left, admission_mismatch,
--   admission_expired,
--   not_admitted, admission_unavailable (the waiting room is being restored)
-- are not remembered.
-- With the gate, or without it and ARGV[6N+2] = 'holds' (on a Redis Cluster, where the gate
-- cannot run here), a granted answer carries its hold record as it stands now after \30 (a
-- replay's hold may have moved on), and a last element N+1 gives "price \31 currency": the
-- gateway publishes the reservation's event without reading the hold back.
--
-- Cost model: every Redis command runs once per *batch*, not once per request. Lookups are one
-- HMGET each (idempotency answers, buyer counts, counters), reading columns straight from ARGV,
-- and writes are one multi-field command each (holds, buyers, idempotency answers, counters),
-- plus one deadline-index member and one outbox entry for the whole batch. Requests later in
-- the batch see the effects of earlier ones through the Lua tables below.
local K = KEYS
local n = tonumber(ARGV[1])
local results = {}

local meta = redis.call('HMGET', K[1], 'status', 'starts_at_ms', 'ends_at_ms',
  'per_buyer_limit', 'hold_ttl_ms', 'price', 'currency', 'sale_id', 'sku', 'rebuilding',
  'buckets')
local stock = redis.call('HMGET', K[2], 'available', 'active', 'paying')
local now = now_ms()
local gate = nil
if not meta[1] or meta[10] or not stock[1] then
  gate = 'unavailable'
elseif meta[1] == 'ended' or now >= tonumber(meta[3]) then
  gate = 'ended'
elseif meta[1] == 'paused' then
  gate = 'paused'
elseif now < tonumber(meta[2]) then
  gate = 'not_started'
end

local ID, BUYER, QTY, PAYREF, ADMISSION, IDEM = 1, n + 1, 2 * n + 1, 3 * n + 1, 4 * n + 1, 5 * n + 1
local seen = redis.call('HMGET', K[6], unpack(ARGV, IDEM + 1, IDEM + n))

-- The admission gate of request i: nil when it may be decided, else its refusal. A request
-- that passes it and does not hold its claim yet gets claiming[i], the member its claim
-- replaces (lib.lua check_claim); the claim is written once the request is decided.
local admit = nil
local claiming = {}
local save_rates = nil  -- writes back the rate keys the gate counted (lib.lua rate_gate)
local with_holds = #K > 7 or ARGV[6 * n + 2] == 'holds'
local MEMBER, DEADLINE = 6 * n + 1, 7 * n + 1
if #K > 7 then
  local live = redis.call('HMGET', K[8], 'live', 'serving')
  local serving = tonumber(live[2] or '0')
  local limited
  limited, save_rates = rate_gate(K, ARGV, 8 * n + 1, 9 * n + 1, 10 * n + 1)
  admit = function(i)
    local member = ARGV[MEMBER + i]
    if member == '' then
      return nil
    end
    local wait = limited(i)
    if wait > 0 then
      return 'rate_limited' .. SEP .. wait
    end
    if not live[1] then
      return 'admission_unavailable'
    end
    local refusal, prior = check_claim(K[9], ARGV[ADMISSION + i], member,
      tonumber(ARGV[DEADLINE + i]), serving, now)
    if refusal then
      return refusal == 'not_admitted' and refusal or 'admission_' .. refusal
    end
    claiming[i] = prior or nil
    return nil
  end
end

-- The claim of gated request i, once decided: kept by a grant, marked by a refusal the
-- request would be given again (the sale's state is not one).
local function settle_claim(i, answer)
  local prior = claiming[i]
  if prior == nil then
    return
  end
  local head = string.sub(answer, 1, 8)
  if head == 'reserved' then
    write_claim(K[9], ARGV[ADMISSION + i], ARGV[MEMBER + i], prior, false)
  elseif head == 'sold_out' or head == 'limit_ex' or head == 'invalid_' then
    write_claim(K[9], ARGV[ADMISSION + i], ARGV[MEMBER + i], prior, true)
  end
end

-- The last step, once the batch is decided: write back the rate keys the gate counted (each
-- once: lib.lua rate_gate), and give each granted answer its hold record as it stands now:
-- `fresh` holds this batch's grants (id -> record), a replay's comes from the hash.
local function finish(fresh)
  if save_rates then
    save_rates()
  end
  local any = false
  for i = 1, n do
    local answer = results[i]
    if string.sub(answer, 1, 9) == 'reserved' .. SEP then
      local id = string.sub(answer, 10, string.find(answer, SEP, 10, true) - 1)
      results[i] = answer .. '\30' .. (fresh[id] or redis.call('HGET', K[3], id) or '')
      any = true
    end
  end
  if any then
    results[n + 1] = (meta[6] or '') .. SEP .. (meta[7] or '')
  end
end

-- The remembered answer for a repeated key, or idempotency_mismatch when the quantity or the
-- payment differ from the first request's.
local function replay(prior, qty_raw, payref)
  local sep_at = string.find(prior, '\30', 1, true)
  if string.sub(prior, 1, sep_at - 1) ~= qty_raw .. SEP .. payref then
    return 'idempotency_mismatch'
  end
  return string.sub(prior, sep_at + 1)
end

if gate then
  -- Nothing can be granted: replay remembered answers, refuse the rest with the sale's state.
  for i = 1, n do
    local refused = admit and admit(i)
    results[i] = refused or seen[i] and replay(seen[i], ARGV[QTY + i], ARGV[PAYREF + i]) or gate
  end
  if with_holds then
    finish({})
  end
  return results
end

local limit = tonumber(meta[4])
local deadline = now + tonumber(meta[5])
local counted_raw = redis.call('HMGET', K[5], unpack(ARGV, BUYER + 1, BUYER + n))
local available, active, paying = tonumber(stock[1]), tonumber(stock[2]), tonumber(stock[3])

-- Strings shared by every hold of the batch, built once.
local at = SEP .. deadline .. SEP                 -- qty .. at .. payref
local created = SEP .. now .. SEP .. SEP          -- admission .. created .. idem_field
local granted_tail = SEP .. deadline              -- 'reserved' .. SEP .. id .. granted_tail
local sold_out = (active + paying) > 0 and 'sold_out' .. SEP .. '1' or 'sold_out' .. SEP .. '0'
local bucketed = meta[11] and meta[11] ~= '1'

local counted = {}     -- buyer -> units counted against the limit, as updated by this batch
local decided = {}     -- idem_field -> remembered value, for repeats inside this batch
local holds = {}       -- id, record, id, record, ... for HSET holds and the outbox entry
local ids = {}         -- granted ids, one deadline-index member for the batch
local idem_out = {}    -- idem_field, value, ... for HSET idem
local granted, answered = 0, 0  -- explicit lengths: # on a table costs a search in Lua 5.1

for i = 1, n do
  local qty_raw, payref, idem_field = ARGV[QTY + i], ARGV[PAYREF + i], ARGV[IDEM + i]
  local prior = decided[idem_field] or seen[i]
  local answer = admit and admit(i)
  if answer then  -- refused at the gate: neither decided nor remembered
  elseif prior then
    answer = replay(prior, qty_raw, payref)
  else
    local qty = tonumber(qty_raw)
    if not qty or qty < 1 or qty ~= math.floor(qty) then
      answer = 'invalid_quantity'
    else
      local buyer = ARGV[BUYER + i]
      local have = counted[buyer] or tonumber(counted_raw[i] or '0')
      if have + qty > limit then
        answer = 'limit_exceeded' .. SEP .. have
      elseif available < qty then
        -- fewer than asked: how many
        answer = available > 0 and (sold_out .. SEP .. available) or sold_out
      else
        local id = ARGV[ID + i]
        available = available - qty
        active = active + qty
        counted[buyer] = have + qty
        granted = granted + 1
        ids[granted] = id
        holds[2 * granted - 1] = id
        holds[2 * granted] = 'ACTIVE' .. SEP .. qty_raw .. at .. payref .. SEP
          .. ARGV[ADMISSION + i] .. created .. idem_field
        answer = 'reserved' .. SEP .. id .. granted_tail
      end
    end
    if not (bucketed and string.sub(answer, 1, 8) == 'sold_out') then
      local value = qty_raw .. SEP .. payref .. '\30' .. answer
      decided[idem_field] = value
      answered = answered + 1
      idem_out[2 * answered - 1] = idem_field
      idem_out[2 * answered] = value
    end
  end
  if admit then
    settle_claim(i, answer)
  end
  results[i] = answer
end

if granted > 0 then
  local buyers_out = {}
  for buyer, have in pairs(counted) do
    buyers_out[#buyers_out + 1] = buyer
    buyers_out[#buyers_out + 1] = have
  end
  redis.call('HSET', K[2], 'available', available, 'active', active)
  redis.call('HSET', K[5], unpack(buyers_out))
  redis.call('HSET', K[3], unpack(holds))
  -- The deadline index holds one member per batch: its granted ids, scored by their deadline.
  redis.call('ZADD', K[4], deadline, table.concat(ids, SEP))
  -- One outbox entry carries every hold granted by this batch: a header with the SKU's fields,
  -- then one field per reservation id whose value is its hold record (see lib.lua).
  redis.call('XADD', K[7], '*', 'type', 'reservation.created', 'sale_id', meta[8],
    'sku', meta[9], 'unit_price', meta[6], 'currency', meta[7], 'count', granted,
    unpack(holds))
end
if answered > 0 then
  redis.call('HSET', K[6], unpack(idem_out))
end
if with_holds then
  local fresh = {}
  for g = 1, granted do
    fresh[holds[2 * g - 1]] = holds[2 * g]
  end
  finish(fresh)
end
return results
