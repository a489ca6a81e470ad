-- release: ACTIVE or PAYING -> RELEASED; the units go back to available exactly once.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox
-- ARGV[1] reservation id   ARGV[2] cause (cancelled | payment_failed | ...)
-- ARGV[3] 'active_only' (optional): refuse a PAYING hold (a buyer may not cancel mid-charge)
-- Returns {ok, state, reason}: ok = 1 when the hold is (now or already) RELEASED.
local K, id = KEYS, ARGV[1]
local h = load_hold(K, id)
if not h then
  return {0, 'UNKNOWN', 'unknown_reservation'}
end
if h.state == 'RELEASED' then
  return {1, 'RELEASED', 'already_released'}
end
if h.state == 'SOLD' then
  return {0, 'SOLD', 'already_sold'}
end
if h.state == 'PAYING' and ARGV[3] == 'active_only' then
  return {0, 'PAYING', 'payment_in_progress'}
end
release_hold(K, id, h, ARGV[2], 'reservation.released', now_ms())
return {1, 'RELEASED', 'ok'}
