-- lib: shared helpers, prepended by the bindings (allocator/redis_calls.py) to the hold,
-- waiting-room and repair scripts.
--
-- Hold record (one field of the holds hash, fields joined by \31):
--   state, qty, deadline_ms, payment_ref, admission_id, created_ms, cause, buyer, idem
-- The record ends with the idempotency field "buyer \31 key", so reserve builds it with one
-- concatenation. Python reads and writes it with flashsale.records.HoldRecord (held against
-- these scripts by tests/test_records.py).
-- States: ACTIVE -> PAYING -> SOLD; ACTIVE|PAYING -> RELEASED.
local SEP = '\31'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function split(s)
  local out = {}
  for part in string.gmatch(s .. SEP, '(.-)' .. SEP) do
    out[#out + 1] = part
  end
  return out
end

local function decode_hold(raw)
  local f = split(raw)
  return {state = f[1], qty = tonumber(f[2]), deadline = tonumber(f[3]), payref = f[4],
          admission = f[5], created = f[6], cause = f[7], buyer = f[8], idem = f[9]}
end

-- The head of a hold record, without splitting the rest: {state, qty, deadline, raw, cut},
-- `cut` being where the state ends. A transition that only changes the state writes
-- `new_state .. raw:sub(cut)`: splitting and re-joining all nine fields of every hold cost
-- most of a batched transition's time.
local function hold_head(raw)
  local a = string.find(raw, SEP, 1, true)
  local b = string.find(raw, SEP, a + 1, true)
  local c = string.find(raw, SEP, b + 1, true)
  return {state = string.sub(raw, 1, a - 1), qty = tonumber(string.sub(raw, a + 1, b - 1)),
          deadline = tonumber(string.sub(raw, b + 1, c - 1)), raw = raw, cut = a}
end

local function encode_hold(h)
  return table.concat({h.state, h.qty, h.deadline, h.payref, h.admission, h.created,
                       h.cause or '', h.buyer, h.idem}, SEP)
end

-- Give a hold's units back exactly once: the caller has checked the state is ACTIVE/PAYING.
-- The hold's id stays in its deadline-index member; the sweeper skips holds no longer ACTIVE.
-- K: meta, stock, holds, deadlines, buyers, idem, outbox
local function release_hold(K, id, h, cause, event, now)
  local counter = h.state == 'ACTIVE' and 'active' or 'paying'
  redis.call('HINCRBY', K[2], counter, -h.qty)
  redis.call('HINCRBY', K[2], 'available', h.qty)
  if redis.call('HINCRBY', K[5], h.buyer, -h.qty) <= 0 then
    redis.call('HDEL', K[5], h.buyer)
  end
  local previous = h.state
  h.state = 'RELEASED'
  h.cause = cause
  redis.call('HSET', K[3], id, encode_hold(h))
  redis.call('XADD', K[7], '*', 'type', event, 'reservation_id', id,
    'sale_id', redis.call('HGET', K[1], 'sale_id'), 'sku', redis.call('HGET', K[1], 'sku'),
    'buyer_id', h.buyer, 'quantity', h.qty, 'from_state', previous, 'cause', cause,
    'at_ms', now)
end

-- The hold `id` decoded, or nil when no such reservation exists. K[3] is the holds hash.
local function load_hold(K, id)
  local raw = redis.call('HGET', K[3], id)
  if raw then
    return decode_hold(raw)
  end
  return nil
end

-- Admission claims: a sale's `claims` zset holds one member per used place, "position \31
-- idempotency key \31 fingerprint" (flashsale.records.ClaimMember; "position \31\31left" for
-- a buyer who left). Only a granted request uses an admission up. A request its decision
-- refused (sold out, over the limit) keeps its claim marked REFUSED: the same key still names
-- that request (another body with it is a mismatch), while another key may claim the
-- admission as long as the turn lasts.
local REFUSED = SEP .. 'refused'

-- The claim check of `member` at position p (a string): nil and the member it replaces ('' for
-- none; false when `member` holds the place already), or the refusal: 'mismatch' (this key
-- with another request), 'used', 'left' (its buyer gave the place up), 'expired',
-- 'not_admitted'. A `deadline` of 0: the request
-- passed the window and serving checks before (asked again after a stock transfer).
local function check_claim(claims, p, member, deadline, serving, now)
  local prior = redis.call('ZRANGEBYSCORE', claims, p, p, 'LIMIT', 0, 1)[1]
  if prior == member then
    return nil, false
  end
  if prior then
    local same_key = string.sub(member, 1, #member - 16)  -- fingerprints are 16 characters
    if prior ~= member .. REFUSED and string.sub(prior, 1, #same_key) == same_key then
      return 'mismatch'
    end
    if string.sub(prior, -#REFUSED) ~= REFUSED then
      return prior == p .. SEP .. SEP .. 'left' and 'left' or 'used'
    end
  end
  if deadline ~= 0 then
    if now > deadline then
      return 'expired'
    end
    if tonumber(p) > serving then
      return 'not_admitted'
    end
  end
  return nil, prior or ''
end

-- Record `member` at position p in place of `prior` (as check_claim returned it): as it is
-- for a granted request, marked REFUSED for one its decision refused.
local function write_claim(claims, p, member, prior, refused)
  if prior ~= '' then
    redis.call('ZREM', claims, prior)
  end
  redis.call('ZADD', claims, p, refused and member .. REFUSED or member)
end

-- Rate limits counted inside a batched script: the gateway on a single Redis node passes the
-- batch's rate-limit keys as extra KEYS of its join or reserve call (each key once). GCRA as
-- lua/ratelimit.lua, judged by Redis TIME; later requests of the batch see earlier counts.
-- The script's ARGV holds, for request i, the KEYS index of its per-IP key at A[ip_at + i] and
-- of its per-buyer key at A[buyer_at + i] (0: that limit is off), and the four rates (per-IP
-- interval and tolerance, per-buyer interval and tolerance, us) at A[rates_at + 1..4].
-- Returns wait(i): 0 when request i is allowed (and counted against both keys), else the
-- microseconds until it would be (a refusal by one limit is still counted by the other); and
-- save(), which writes each key the batch counted back once, expiring when its time is in
-- the past.
local function rate_gate(K, A, ip_at, buyer_at, rates_at)
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local tats = {}  -- KEYS index -> theoretical arrival time (us), as updated by this batch
  local function spend(index, interval, tolerance)
    if index == 0 or interval == 0 then
      return 0
    end
    local tat = tats[index]
    if tat == nil then
      tat = tonumber(redis.call('GET', K[index]) or '0')
    end
    if tat < now_us then
      tat = now_us
    end
    local wait = tat - tolerance - now_us
    if wait > 0 then
      tats[index] = tat
      return math.ceil(wait)
    end
    tats[index] = tat + interval
    return 0
  end
  local function save()
    if not next(tats) then
      return
    end
    local t2 = redis.call('TIME')
    local now2 = tonumber(t2[1]) * 1000000 + tonumber(t2[2])
    for index, tat in pairs(tats) do
      if tat > now2 then
        redis.call('SET', K[index], string.format('%.0f', tat), 'PX',
          math.ceil((tat - now2) / 1000) + 1)
      end
    end
  end
  local ip_interval, ip_tolerance = tonumber(A[rates_at + 1]), tonumber(A[rates_at + 2])
  local buyer_interval, buyer_tolerance = tonumber(A[rates_at + 3]), tonumber(A[rates_at + 4])
  local function wait(i)
    return math.max(spend(tonumber(A[ip_at + i]), ip_interval, ip_tolerance),
                    spend(tonumber(A[buyer_at + i]), buyer_interval, buyer_tolerance))
  end
  return wait, save
end

-- A sale's pauses, kept on its hash so that a pause does not use up an admitted buyer's turn
-- (an admission window is window_ms of the sale not paused: allocator/queue_scripts.py
-- QueueView.paused_between): `pauses` lists the finished ones as "start:end,start:end" (ms),
-- `paused_at_ms` is when the one going on began (0: none). The fields for a sale hash whose
-- status was `was` (its pauses read as {pauses, paused_at_ms}) given `status` at `now`.
local function pause_fields(was, kept, status, now)
  local pauses, since = kept[1] or '', tonumber(kept[2] or '0')
  if status == 'paused' then
    return {'pauses', pauses, 'paused_at_ms', (was == 'paused' and since > 0) and since or now}
  end
  if was == 'paused' and since > 0 and now > since then
    pauses = pauses .. (pauses == '' and '' or ',') .. since .. ':' .. now
  end
  return {'pauses', pauses, 'paused_at_ms', 0}
end

-- The waiting room: the first join or pump step at or after the start closes the pre-queue.
-- Its buyers own positions 1..pre (the pump assigns them by the seeded shuffle); later joins
-- take tail + 1. Returns the tail. `queue` is the sale's queue hash, `starts` its start (ms).
local function seal_prequeue(queue, starts, now)
  local q = redis.call('HMGET', queue, 'sealed', 'pre', 'tail')
  if q[1] == '1' then
    return tonumber(q[3] or '0')
  end
  if now < starts then
    return nil
  end
  local pre = tonumber(q[2] or '0')
  redis.call('HSET', queue, 'sealed', 1, 'tail', pre, 'shuffled', pre == 0 and 1 or 0)
  return pre
end

-- Move a batch of holds (ids, decided in order) to state `to`, moving their units from the
-- stock counter `from_counter` to `to_counter`. `decide(id, head)` looks at a hold not yet
-- in `to` (its head: state, qty, deadline, raw record; see hold_head): it returns nothing to
-- move it, or {ok, state, reason} to leave it (setting head.state if it changed the hold
-- itself). A hold already in `to` answers ok (`already_<to>`, or `ok` when this call moved
-- it). Every counter and record is written once per batch. Returns {ok, state, reason} per
-- id, flattened.
-- K: meta, stock, holds, deadlines, buyers, idem, outbox
local function move_holds(K, ids, to, from_counter, to_counter, decide)
  local raw = redis.call('HMGET', K[3], unpack(ids))
  local holds, moved_now, writes, out = {}, {}, {}, {}
  local units = 0
  local already = 'already_' .. string.lower(to)
  for i = 1, #ids do
    local id = ids[i]
    local h = holds[id]
    if h == nil then
      h = raw[i] and hold_head(raw[i]) or false
      holds[id] = h
    end
    local ok, state, reason
    if not h then
      ok, state, reason = 0, 'UNKNOWN', 'unknown_reservation'
    elseif h.state == to then
      ok, state, reason = 1, to, moved_now[id] and 'ok' or already
    else
      ok, state, reason = decide(id, h)
      if ok == nil then
        h.state = to
        units = units + h.qty
        moved_now[id] = true
        writes[#writes + 1] = id
        writes[#writes + 1] = to .. string.sub(h.raw, h.cut)
        ok, state, reason = 1, to, 'ok'
      end
    end
    out[3 * i - 2], out[3 * i - 1], out[3 * i] = ok, state, reason
  end
  if units > 0 then
    redis.call('HINCRBY', K[2], from_counter, -units)
    redis.call('HINCRBY', K[2], to_counter, units)
    redis.call('HSET', K[3], unpack(writes))
  end
  return out
end
