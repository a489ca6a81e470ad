-- release: ACTIVE or PAYING -> RELEASED; the units go back to available exactly once.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox
-- ARGV[1] cause (cancelled | payment_failed | ...)
-- ARGV[2] 'active_only' or '': with active_only a PAYING hold is refused (a buyer may not
--         cancel mid-charge)
-- ARGV[3..] reservation ids
-- Returns {ok, state, reason} per id, flattened: ok = 1 when the hold is (now or already)
-- RELEASED. Ids are decided in order; an id given twice sees its own earlier outcome.
local K = KEYS
local cause, active_only = ARGV[1], ARGV[2] == 'active_only'
local out = {}
local now = nil
local seen = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local ok, state, reason
  if seen[id] then
    ok, state, reason = seen[id][1], seen[id][2], seen[id][3] == 'ok' and 'already_released'
      or seen[id][3]
  else
    local h = load_hold(K, id)
    if not h then
      ok, state, reason = 0, 'UNKNOWN', 'unknown_reservation'
    elseif h.state == 'RELEASED' then
      ok, state, reason = 1, 'RELEASED', 'already_released'
    elseif h.state == 'SOLD' then
      ok, state, reason = 0, 'SOLD', 'already_sold'
    elseif h.state == 'PAYING' and active_only then
      ok, state, reason = 0, 'PAYING', 'payment_in_progress'
    else
      now = now or now_ms()
      release_hold(K, id, h, cause, 'reservation.released', now)
      ok, state, reason = 1, 'RELEASED', 'ok'
    end
    seen[id] = {ok, state, reason}
  end
  local j = 3 * (i - 2)
  out[j - 2], out[j - 1], out[j] = ok, state, reason
end
return out
