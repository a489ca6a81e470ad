-- expire: sweep ACTIVE holds whose deadline (Redis TIME) has passed, looking at no more than
-- ARGV[1] holds per call so one call stays short.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox
-- The deadline index has one member per reserve batch: its ids joined by \31, scored by their
-- common deadline. Each due hold still ACTIVE becomes RELEASED (cause expired), its units go
-- back and reservation.expired is appended; holds already PAYING, SOLD or RELEASED are skipped.
-- A member looked at in full is removed; the rest of a partly looked-at member is put back.
-- Returns {more, id...}: more = 1 when due members remain, then the ids this call expired.
-- Racing sweepers cannot double-release: the state check and the release are one script.
local K = KEYS
local budget = tonumber(ARGV[1])
local now = now_ms()
local expired = {}
local more = 0
while true do
  local due = redis.call('ZRANGEBYSCORE', K[4], '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1)
  if #due == 0 then
    break
  end
  if budget <= 0 then
    more = 1
    break
  end
  local member, score = due[1], due[2]
  local members = split(member)
  local rest = {}
  for _, id in ipairs(members) do
    if budget > 0 then
      budget = budget - 1
      local h = load_hold(K, id)
      if h and h.state == 'ACTIVE' then
        release_hold(K, id, h, 'expired', 'reservation.expired', now)
        expired[#expired + 1] = id
      end
    else
      rest[#rest + 1] = id
    end
  end
  redis.call('ZREM', K[4], member)
  if #rest > 0 then
    redis.call('ZADD', K[4], score, table.concat(rest, SEP))
  end
end
table.insert(expired, 1, more)
return expired
