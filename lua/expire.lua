-- expire: sweep up to ARGV[1] ACTIVE holds whose deadline (Redis TIME) has passed.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox
-- Each becomes RELEASED (cause expired), its units go back, reservation.expired is appended.
-- Returns the ids expired by this call. Racing sweepers cannot double-release: the state check
-- and the release happen in one script.
local K = KEYS
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', K[4], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local expired = {}
for _, id in ipairs(due) do
  local raw = redis.call('HGET', K[3], id)
  if raw then
    local h = decode_hold(raw)
    if h.state == 'ACTIVE' then
      release_hold(K, id, h, 'expired', 'reservation.expired', now)
      expired[#expired + 1] = id
    else
      redis.call('ZREM', K[4], id)
    end
  else
    redis.call('ZREM', K[4], id)
  end
end
return expired
