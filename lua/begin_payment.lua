-- begin_payment: ACTIVE -> PAYING, so a hold cannot expire while the provider charges.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox   ARGV: reservation ids (1..n)
-- Returns {ok, state, reason} per id, flattened: ok = 1 when the hold is (now or already)
-- PAYING. An ACTIVE hold past its deadline is expired here (stock back, reservation.expired)
-- and refused, exactly as the sweeper would have done: a late payment never revives it.
-- Ids are decided in order; an id given twice sees its own earlier outcome.
local K = KEYS
local now = nil
return move_holds(K, ARGV, 'PAYING', 'active', 'paying', function(id, h)
  if h.state ~= 'ACTIVE' then
    return 0, h.state, h.state == 'SOLD' and 'already_sold' or 'released'
  end
  now = now or now_ms()
  if now >= h.deadline then
    release_hold(K, id, decode_hold(h.raw), 'expired', 'reservation.expired', now)
    h.state = 'RELEASED'
    return 0, 'RELEASED', 'expired'
  end
end)
